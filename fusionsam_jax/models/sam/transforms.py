"""SAM's pre- and post-processing (ports of `ResizeLongestSide`, `Sam.preprocess` and
`Sam.postprocess_masks`).

Images are resized with Pillow's bilinear filter exactly as `segment_anything` does
(torchvision's `resize` on a PIL image calls PIL's bilinear resize).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image



def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
  """(h, w) after scaling the longest side to `long_side_length` (SAM's rounding)."""
  scale = long_side_length * 1.0 / max(oldh, oldw)
  newh, neww = oldh * scale, oldw * scale
  return int(newh + 0.5), int(neww + 0.5)


def to_numpy(x, dtype=None) -> np.ndarray:
  """numpy, JAX or PyTorch (any device) array -> numpy array."""
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x, dtype)


def is_torch(x) -> bool:
  return type(x).__module__.split(".")[0] == "torch"


def like(x: np.ndarray, ref):
  """`x` as a torch tensor when `ref` is one (the official torch-in, torch-out calls), else
  as is."""
  if is_torch(ref):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x)).to(ref.device)
  return x


class ResizeLongestSide:
  """Resizes images, coordinates and boxes so the longest side is `target_length`."""

  def __init__(self, target_length: int):
    self.target_length = target_length

  def apply_image(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (h, w, C), PIL bilinear."""
    if image.dtype != np.uint8 or image.ndim != 3:
      raise ValueError(f"expected a uint8 HxWxC image, got {image.dtype} {image.shape}")
    h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

  def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    """(..., 2) xy pixel coordinates in the original image -> the resized frame."""
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords

  def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    """(B, 4) xyxy boxes -> the resized frame."""
    return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

  def apply_coords_torch(self, coords, original_size: Tuple[int, int]):
    """`apply_coords` on a numpy, JAX or torch array; float32, a torch tensor for a torch
    input (as the official method), numpy otherwise."""
    out = self.apply_coords(to_numpy(coords, np.float64), original_size).astype(np.float32)
    return like(out, coords)

  def apply_boxes_torch(self, boxes, original_size: Tuple[int, int]):
    """`apply_boxes` on a numpy, JAX or torch array of (B, 4) boxes; float32, a torch
    tensor for a torch input, numpy otherwise."""
    b = to_numpy(boxes, np.float64)
    out = self.apply_coords(b.reshape(-1, 2, 2), original_size).reshape(b.shape)
    return like(out.astype(np.float32), boxes)


def resize_bilinear(x, size: Tuple[int, int]):
  """`F.interpolate(mode="bilinear", align_corners=False)` on (..., H, W) maps."""
  return jax.image.resize(x, x.shape[:-2] + tuple(size), "linear", antialias=False)


def size_bucket(n: int) -> int:
  """The padded length an output side of `n` pixels is computed at (then cropped on the host).

  256, 512, 768, 1024, 1536, 2048, 3072, 4096, then multiples of 2048: few distinct sizes,
  at most 1.5x the pixels per side above 512.
  """
  for b in (256, 512, 768, 1024, 1536, 2048, 3072, 4096):
    if n <= b:
      return b
  return -(-n // 2048) * 2048


def bilinear_taps(in_len: int, out_len: int, padded_len: Optional[int] = None):
  """Source indices and weights of `F.interpolate(mode="bilinear", align_corners=False)`
  along one axis, computed as PyTorch does (float32 scale in / out, clamped at 0).

  Returns (i0, i1, w1), each (padded_len,): out[d] = (1 - w1) * in[i0] + w1 * in[i1].
  Entries past `out_len` are padding (index 0, weight 0); the caller crops them away.
  """
  padded_len = padded_len or out_len
  if not 0 < out_len <= padded_len or in_len <= 0:
    raise ValueError(f"bad resize {in_len} -> {out_len} (padded to {padded_len})")
  scale = np.float32(in_len) / np.float32(out_len)
  src = scale * (np.arange(out_len, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int32)
  i1 = np.where(i0 < in_len - 1, i0 + 1, i0).astype(np.int32)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  pad = padded_len - out_len
  return (np.pad(i0, (0, pad)), np.pad(i1, (0, pad)), np.pad(w1, (0, pad)))


def resize_with_taps(x, taps_y, taps_x):
  """Separable bilinear resize of (..., H, W) maps by gathering with `bilinear_taps`."""
  y0, y1, wy = taps_y
  x0, x1, wx = taps_x
  wy = wy[:, None].astype(x.dtype)
  x = jnp.take(x, y0, axis=-2) * (1 - wy) + jnp.take(x, y1, axis=-2) * wy
  return jnp.take(x, x0, axis=-1) * (1 - wx).astype(x.dtype) + jnp.take(x, x1, axis=-1) * wx


def postprocess_masks_padded(masks, taps_y, taps_x, img_size: int = 1024):
  """SAM's `postprocess_masks` (resize to the canvas, crop the input, resize to the
  original size) with the size-dependent part in data, not in shapes.

  Upsamples the low-res logits to the fixed (img_size, img_size) canvas, then resizes the
  (input_size) crop to original_size with precomputed taps (whose indices never leave the
  crop), padded to a size bucket. The caller crops [..., :H, :W]; the values there are
  those of SAM's postprocess.
  """
  masks = resize_bilinear(masks, (img_size, img_size))
  return resize_with_taps(masks, taps_y, taps_x)
