"""The paper's Fig. 7a baseline: SAM zero-shot on the fused image with point / box prompts.

  fused = fused_image_uint8(model, params, batch)[0]          # (H, W, 3) uint8
  masks, scores, logits = zero_shot(predictor, fused, point_coords=[[x, y]], point_labels=[1])

The prompts are the user's (clicks, boxes), as in SAM's interactive use; nothing here reads
ground truth.
"""

from typing import Optional

import jax
import numpy as np

from fusionsam_jax import stages
from fusionsam_jax.models.fusionsam import FusionSAM
from fusionsam_jax.models.sam.predictor import SamPredictor


def fused_image_uint8(model: FusionSAM, params, batch) -> np.ndarray:
  """The fusion stage's fused image (B, H, W, 3) as uint8, for SAM or for saving."""
  images = stages.inputs_from_batch(batch, model.modalities)
  latents = model.apply({"params": params}, images, method=FusionSAM.tokenize)
  fused = model.apply({"params": params}, latents, images, method=FusionSAM.fuse)["fused"]
  return np.asarray(jax.device_get(fused * 255.0 + 0.5)).clip(0, 255).astype(np.uint8)


def zero_shot(predictor: SamPredictor, fused_image: np.ndarray, point_coords=None,
              point_labels=None, box=None, multimask_output: bool = False):
  """SAM on the fused image: (masks (C, H, W) bool, iou (C,), low-res logits)."""
  predictor.set_image(np.asarray(fused_image, np.uint8))
  return predictor.predict(
      point_coords=None if point_coords is None else np.asarray(point_coords, np.float32),
      point_labels=None if point_labels is None else np.asarray(point_labels),
      box=None if box is None else np.asarray(box, np.float32),
      multimask_output=multimask_output)
