"""`SamPredictor`: the official `segment_anything.SamPredictor` API on the Flax port.

  predictor = SamPredictor.from_checkpoint("ckpt/sam_vit_h")
  predictor.set_image(image)                     # uint8 (H, W, 3), RGB
  masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]),
                                            point_labels=np.array([1]))

The image embedding is computed once per `set_image` by a jit-compiled encoder; prompts run
through a separately jitted decoder. Outputs are numpy arrays shaped as the official ones:
masks (C, H, W), iou_predictions (C,), low_res_logits (C, 256, 256). `get_image_embedding`
returns the embedding channels-last, (1, 64, 64, 256).
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax.models.sam.sam import Sam, SamConfig
from fusionsam_jax.models.sam.transforms import ResizeLongestSide, postprocess_masks, preprocess


class SamPredictor:
  """Computes an image embedding once, then answers prompts quickly."""

  mask_threshold = 0.0

  def __init__(self, config: SamConfig, params, encoder_dtype=jnp.float32,
               attn_impl: str = "xla"):
    self.config = config
    self.params = params
    self.model = Sam(config, encoder_dtype=encoder_dtype, attn_impl=attn_impl)
    self.transform = ResizeLongestSide(config.img_size)
    self._encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=Sam.encode))
    self._decode = jax.jit(self._decode_impl, static_argnames=("multimask_output",
                                                                "input_size", "original_size",
                                                                "return_logits"))
    self.reset_image()

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str, **kwargs) -> "SamPredictor":
    """Loads a directory written by tools/convert_sam_weights.py."""
    from fusionsam_jax.sam_checkpoint import load_sam_checkpoint
    config, params = load_sam_checkpoint(ckpt_dir)
    return cls(config, params, **kwargs)

  def reset_image(self):
    self.features = None
    self.is_image_set = False
    self.original_size: Optional[Tuple[int, int]] = None
    self.input_size: Optional[Tuple[int, int]] = None

  def set_image(self, image: np.ndarray, image_format: str = "RGB"):
    """Computes the embedding of a uint8 (H, W, 3) image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"set_image expects a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if image_format == "BGR":
      image = image[..., ::-1]
    input_image = self.transform.apply_image(np.ascontiguousarray(image))
    self.original_size = image.shape[:2]
    self.input_size = input_image.shape[:2]
    x = preprocess(input_image, self.config.img_size)[None]
    self.features = self._encode(self.params, x)
    self.is_image_set = True

  def get_image_embedding(self):
    """(1, h, w, C) embedding of the current image (channels-last)."""
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) first.")
    return self.features

  def _decode_impl(self, params, features, coords, labels, boxes, masks, multimask_output,
                   input_size, original_size, return_logits):
    low_res, iou = self.model.apply({"params": params}, features, coords, labels, boxes, masks,
                                    multimask_output, method=Sam.decode)
    out = postprocess_masks(low_res, input_size, original_size, self.config.img_size)
    if not return_logits:
      out = out > self.mask_threshold
    return out, iou, low_res

  def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
              multimask_output: bool = True, return_logits: bool = False):
    """Prompts in original-image pixels (as the official predictor).

    point_coords (N, 2) xy, point_labels (N,), box (4,) xyxy, mask_input (1, 256, 256)
    low-res logits from a previous call. Returns (masks (C, H, W), iou (C,), low_res (C, 256, 256)).
    """
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    coords = labels = boxes = masks = None
    if point_coords is not None:
      if point_labels is None:
        raise ValueError("point_labels must be supplied with point_coords")
      coords = self.transform.apply_coords(np.asarray(point_coords), self.original_size)
      coords = jnp.asarray(coords, jnp.float32)[None]
      labels = jnp.asarray(point_labels, jnp.int32)[None]
    if box is not None:
      boxes = jnp.asarray(self.transform.apply_boxes(np.asarray(box), self.original_size),
                          jnp.float32)[:1]
    if mask_input is not None:
      masks = jnp.asarray(mask_input, jnp.float32)[None].transpose(0, 2, 3, 1)
    out = self.predict_batch(coords, labels, boxes, masks, multimask_output, return_logits)
    return tuple(np.asarray(o[0]) for o in out)

  def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                    multimask_output: bool = True, return_logits: bool = False):
    """Batched prompts already in the resized input frame (`predict_torch` of the official API).

    point_coords (B, N, 2), point_labels (B, N), boxes (B, 4), mask_input (B, 256, 256, 1).
    Returns jax arrays (B, C, H, W), (B, C), (B, C, 256, 256).
    """
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    return self._decode(self.params, self.features, point_coords, point_labels, boxes,
                        mask_input, multimask_output=multimask_output,
                        input_size=tuple(self.input_size),
                        original_size=tuple(self.original_size), return_logits=return_logits)
