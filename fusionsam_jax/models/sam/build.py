"""`sam_model_registry` and `build_sam_vit_{h,l,b}`, as in `segment_anything.build_sam`.

  sam = sam_model_registry["vit_h"](checkpoint="sam_vit_h_4b8939.pth")
  predictor = SamPredictor(sam)

`checkpoint` may be
- a directory written by tools/convert_sam_weights.py (Orbax params + sam_meta.json);
- an official `.pth` (converted in memory; needs PyTorch);
- a Hugging Face `model.safetensors` of `facebook/sam-vit-{h,l,b}` or the folder holding it
  (read with safetensors' numpy API: no PyTorch);
- None: random weights (for tests and shapes).
The builder checks that the weights are the variant it builds.
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.checkpoint import CheckpointError, load_any
from fusionsam_jax.models.sam.predictor import SamPredictor
from fusionsam_jax.models.sam.sam import SAM_PRESETS, LoadedSam, Sam, SamConfig, preset_name


class SamModel(LoadedSam):
  """What the builders return: a `LoadedSam` that is also callable as the official `Sam`
  module on a batch (`sam(batched_input, multimask_output)`)."""

  def __call__(self, batched_input, multimask_output: bool):
    """The official `Sam.forward`: a list of records {"image": (3, H, W) resized with
    ResizeLongestSide (0-255), "original_size": (H, W), optional "point_coords" (B, N, 2),
    "point_labels" (B, N), "boxes" (B, 4), "mask_inputs" (B, 1, 256, 256), prompts in the
    resized frame} -> a list of {"masks" (B, C, H, W) bool, "iou_predictions" (B, C),
    "low_res_logits" (B, C, 256, 256)}: torch tensors where the image was one, else numpy.
    The images are embedded in one batch by a `SamPredictor` kept on the model."""
    if getattr(self, "_predictor", None) is None:
      self._predictor = SamPredictor(self)
    return self._predictor.forward_batched(batched_input, multimask_output)


def load_sam(checkpoint: str, encoder_dtype=jnp.float32, attn_impl: str = "xla") -> SamModel:
  """Any supported checkpoint -> SamModel, the variant read off the weights."""
  cfg, params = load_any(checkpoint)
  return SamModel(cfg, params, encoder_dtype, attn_impl)


def _build(variant: str, checkpoint: Optional[str] = None, encoder_dtype=jnp.float32,
           attn_impl: str = "xla", seed: int = 0) -> SamModel:
  want = SAM_PRESETS[variant]
  if checkpoint is None:
    params = Sam(want).init_params(jax.random.PRNGKey(seed))
    return SamModel(want, params, encoder_dtype, attn_impl)
  sam = load_sam(os.fspath(checkpoint), encoder_dtype, attn_impl)
  if sam.config != want:
    found = preset_name(sam.config) or "a custom size"
    raise CheckpointError(f"{checkpoint}: build_sam_{variant} needs {variant} weights, "
                          f"found {found}")
  return sam


def build_sam_vit_h(checkpoint=None, **kwargs) -> SamModel:
  return _build("vit_h", checkpoint, **kwargs)


def build_sam_vit_l(checkpoint=None, **kwargs) -> SamModel:
  return _build("vit_l", checkpoint, **kwargs)


def build_sam_vit_b(checkpoint=None, **kwargs) -> SamModel:
  return _build("vit_b", checkpoint, **kwargs)


build_sam = build_sam_vit_h

sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
}
