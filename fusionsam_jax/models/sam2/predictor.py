"""`Sam2ImagePredictor`: the API of `sam2.sam2_image_predictor.SAM2ImagePredictor` on the Flax
SAM 2 port.

  predictor = Sam2ImagePredictor.from_checkpoint("ckpt/sam2.1_hiera_l")
  predictor.set_image(image)                    # uint8 (H, W, 3) RGB, or a PIL image
  masks, scores, low_res = predictor.predict(point_coords=np.array([[500, 375]]),
                                             point_labels=np.array([1]))

As in `sam2`: the image is resized to image_size x image_size (bilinear, antialiased, no
aspect-preserving padding) and normalised with the ImageNet mean / std; prompts are in
original-image pixels (`normalize_coords=True`) or in [0, 1] (False); a box is given to the
prompt encoder as two corner points with labels 2 and 3 ahead of the clicks; outputs are
numpy float32 arrays, masks (C, H, W) (0 / 1 unless return_logits), scores (C,), low-res
logits (C, 256, 256) clamped to [-32, 32]. With several boxes (B, 4) the outputs gain a
leading B. `get_image_embedding` returns the embedding channels-last, (1, 64, 64, 256).

The encoder and the decoder are jitted (the upsampling to the original size is a separate
small jit, so a new image size does not recompile the decoder). The number of prompt points
is padded up to a power of two with tokens that are masked out of attention, so a new click
count recompiles only when it crosses a power of two, and the result is that of the unpadded
prompt (to float rounding: padding tokens get exactly zero attention weight).
The hole / sprinkle post-processing of `sam2` (off by default there) is not provided.
"""

import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax.models.sam2.interp import bilinear_aa_matrix, bilinear_matrix, resize_2d
from fusionsam_jax.models.sam2.sam2 import PIXEL_MEAN, PIXEL_STD, Sam2, Sam2Config, Sam2Features

PAD_LABEL = -10  # bucket padding (masked out); sam2's own -1 padding point stays a real token


def _bucket(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


class Sam2ImagePredictor:
  """Computes the image features once, then answers prompts quickly."""

  def __init__(self, config: Sam2Config, params, mask_threshold: float = 0.0,
               encoder_dtype=jnp.float32, attn_impl: str = "xla",
               compiler_options: Optional[dict] = None):
    """`encoder_dtype=jnp.bfloat16, attn_impl="auto"` is the GPU fast path (cuDNN flash
    attention for the long sequences, XLA for Hiera's small windows; "cudnn" everywhere was
    5% slower on an H200: benchmarks/results/sam2_encoder_attn_h200.json);
    `compiler_options` go to every `jax.jit` (e.g. {"xla_backend_optimization_level": 0}
    for quicker compiles on CPU)."""
    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    self.config = config
    self.params = params
    self.mask_threshold = mask_threshold
    self.model = Sam2(config, dtype=encoder_dtype, attn_impl=attn_impl)
    self._encode = jit(lambda p, x: self.model.apply({"params": p}, x, method=Sam2.encode))
    self._preprocess = jit(self._preprocess_impl)
    self._decode = jit(self._decode_impl, static_argnames=("multimask_output",))
    self._postprocess = jit(self._postprocess_impl, static_argnames=("orig_hw",))
    self.reset_predictor()

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str, **kwargs) -> "Sam2ImagePredictor":
    """Loads a directory written by tools/convert_sam2_weights.py."""
    from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint
    config, params = load_sam2_checkpoint(ckpt_dir)
    return cls(config, params, **kwargs)

  def reset_predictor(self):
    self._features: Optional[Sam2Features] = None
    self._orig_hw: Optional[List[Tuple[int, int]]] = None
    self._is_image_set = False
    self._is_batch = False

  # -- images --------------------------------------------------------------------------------

  def _preprocess_impl(self, image):  # uint8 (H, W, 3) -> (S, S, 3) normalised
    s = self.config.image_size
    x = image.astype(jnp.float32) / 255.0
    x = resize_2d(x, (s, s), bilinear_aa_matrix, axes=(0, 1))
    return (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)

  @staticmethod
  def _as_array(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
      try:
        from PIL.Image import Image
      except ImportError:  # pragma: no cover
        Image = ()
      if Image and isinstance(image, Image):
        image = np.asarray(image.convert("RGB"))
      else:
        raise ValueError(f"expected a numpy HxWx3 image or a PIL image, got {type(image)}")
    if image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
      raise ValueError(f"expected uint8 pixels in [0, 255], got {image.dtype}")
    return image

  def set_image(self, image):
    """Computes the features of one RGB image (uint8 numpy HxWx3 or PIL)."""
    self.reset_predictor()
    image = self._as_array(image)
    x = self._preprocess(jnp.asarray(image))[None]
    self._features = self._encode(self.params, x)
    self._orig_hw = [tuple(image.shape[:2])]
    self._is_image_set = True

  def set_image_batch(self, image_list: Sequence[np.ndarray]):
    """Computes the features of several RGB images (for `predict_batch`)."""
    self.reset_predictor()
    if not isinstance(image_list, (list, tuple)) or not image_list:
      raise ValueError("set_image_batch expects a non-empty list of HxWx3 uint8 images")
    images = [self._as_array(im) for im in image_list]
    x = jnp.stack([self._preprocess(jnp.asarray(im)) for im in images])
    self._features = self._encode(self.params, x)
    self._orig_hw = [tuple(im.shape[:2]) for im in images]
    self._is_image_set = True
    self._is_batch = True

  def get_image_embedding(self):
    """(B, h, w, C) image embedding (channels-last; `no_mem_embed` added, as in sam2)."""
    if not self._is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
    return self._features.image_embed

  @property
  def features(self) -> Optional[Sam2Features]:
    return self._features

  # -- prompts -------------------------------------------------------------------------------

  def _prep_prompts(self, point_coords, point_labels, box, mask_input, normalize_coords,
                    img_idx):
    s = self.config.image_size
    h, w = self._orig_hw[img_idx]
    scale = np.array([s / w, s / h] if normalize_coords else [s, s], np.float32)
    coords = labels = masks = None
    if point_coords is not None:
      if point_labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied.")
      coords = np.asarray(point_coords, np.float32) * scale
      labels = np.asarray(point_labels, np.int32)
      if coords.ndim == 2:
        coords, labels = coords[None], labels[None]
      if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
        raise ValueError(f"point_coords (N, 2) / (B, N, 2) and point_labels (N,) / (B, N) "
                         f"expected, got {coords.shape} and {labels.shape}")
    if box is not None:
      b = np.asarray(box, np.float32).reshape(-1, 2, 2) * scale
      blab = np.broadcast_to(np.array([[2, 3]], np.int32), (b.shape[0], 2))
      if coords is not None:
        if coords.shape[0] != b.shape[0]:
          raise ValueError(f"{b.shape[0]} boxes but {coords.shape[0]} point sets")
        coords = np.concatenate([b, coords], 1)
        labels = np.concatenate([blab, labels], 1)
      else:
        coords, labels = b, np.array(blab)
    if mask_input is not None:
      masks = np.asarray(mask_input, np.float32)
      if masks.ndim == 3:
        masks = masks[None]
      if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"mask_input (1, H, W) or (B, 1, H, W) expected, got {masks.shape}")
      masks = masks.transpose(0, 2, 3, 1)
    token_mask = None
    if coords is not None:
      n = coords.shape[1]
      p = _bucket(n)
      if p > n:
        coords = np.pad(coords, ((0, 0), (0, p - n), (0, 0)))
        labels = np.pad(labels, ((0, 0), (0, p - n)), constant_values=PAD_LABEL)
      # + the padding point the prompt encoder appends (a real token in sam2).
      token_mask = np.concatenate([labels != PAD_LABEL, np.ones((labels.shape[0], 1), bool)], 1)
    return coords, labels, masks, token_mask

  def _decode_impl(self, params, features, coords, labels, masks, token_mask, multimask_output):
    low_res, iou, _ = self.model.apply({"params": params}, features, coords, labels, None,
                                       masks, multimask_output, token_mask, method=Sam2.decode)
    return low_res, iou

  @staticmethod
  def _postprocess_impl(low_res, orig_hw):
    """Low-res logits (B, M, h, w) -> logits at the original size, and clamped low-res."""
    return resize_2d(low_res, orig_hw, bilinear_matrix), jnp.clip(low_res, -32.0, 32.0)

  def _predict(self, point_coords, point_labels, box, mask_input, multimask_output,
               return_logits, normalize_coords, img_idx):
    coords, labels, masks, token_mask = self._prep_prompts(
        point_coords, point_labels, box, mask_input, normalize_coords, img_idx)
    feats = self._features
    if feats.image_embed.shape[0] > 1:
      feats = jax.tree_util.tree_map(lambda a: a[img_idx:img_idx + 1], feats)
    low_res, iou = self._decode(self.params, feats, coords, labels, masks, token_mask,
                                multimask_output=bool(multimask_output))
    masks_out, low_res = self._postprocess(
        low_res, orig_hw=tuple(int(v) for v in self._orig_hw[img_idx]))
    masks_out = np.asarray(masks_out, np.float32)
    if not return_logits:
      masks_out = (masks_out > self.mask_threshold).astype(np.float32)
    out = (masks_out, np.asarray(iou, np.float32), np.asarray(low_res, np.float32))
    return tuple(o.squeeze(0) if o.shape[0] == 1 else o for o in out)

  def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
              multimask_output: bool = True, return_logits: bool = False,
              normalize_coords: bool = True):
    """point_coords (N, 2) xy, point_labels (N,) 1 / 0, box (4,) or (B, 4) xyxy, mask_input
    (1, 256, 256) low-res logits from a previous call. -> (masks, scores, low_res_logits)."""
    if not self._is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    return self._predict(point_coords, point_labels, box, mask_input, multimask_output,
                         return_logits, normalize_coords, 0)

  def predict_batch(self, point_coords_batch=None, point_labels_batch=None, box_batch=None,
                    mask_input_batch=None, multimask_output: bool = True,
                    return_logits: bool = False, normalize_coords: bool = True):
    """Per-image prompt lists after `set_image_batch`: -> lists of masks, scores, logits."""
    if not self._is_batch:
      raise RuntimeError("predict_batch needs images set with .set_image_batch(...)")
    outs = ([], [], [])
    for i in range(len(self._orig_hw)):
      pick = lambda lst: None if lst is None else lst[i]
      res = self._predict(pick(point_coords_batch), pick(point_labels_batch), pick(box_batch),
                          pick(mask_input_batch), multimask_output, return_logits,
                          normalize_coords, i)
      for acc, r in zip(outs, res):
        acc.append(r)
    return outs
