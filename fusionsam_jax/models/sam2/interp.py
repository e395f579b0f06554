"""PyTorch's `F.interpolate` modes as fixed (out, in) matrices, applied with einsum.

Every resize in SAM 2's image path has static sizes (the position-embedding resize, the image
resize, the mask upsampling), so each is a separable linear map whose weights are computed
once in numpy, following PyTorch's index/weight formulas:
- `bicubic_matrix`: mode="bicubic", align_corners=False (cubic convolution, A = -0.75,
  source indices clamped to the border);
- `bilinear_matrix`: mode="bilinear", align_corners=False, antialias=False;
- `bilinear_aa_matrix`: mode="bilinear", align_corners=False, antialias=True (the triangle
  filter widened by the downscale factor, as torchvision's tensor `Resize`).
"""

import functools

import jax.numpy as jnp
import numpy as np


def _cubic_weights(t, a=-0.75):
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
  scale = in_size / out_size
  src = (np.arange(out_size) + 0.5) * scale - 0.5
  i0 = np.floor(src).astype(np.int64)
  w = _cubic_weights(src - i0)
  m = np.zeros((out_size, in_size), np.float64)
  for k in range(4):
    idx = np.clip(i0 - 1 + k, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), w[:, k])
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  l1 = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - l1)
  np.add.at(m, (np.arange(out_size), i1), l1)
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def bilinear_aa_matrix(out_size: int, in_size: int) -> np.ndarray:
  scale = in_size / out_size
  support = scale if scale >= 1.0 else 1.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    j = np.arange(xmin, xmax)
    w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * invscale))
    total = w.sum()
    m[i, xmin:xmax] = w / total if total > 0 else w
  return m.astype(np.float32)


def resize_2d(x, size, matrix_fn, axes=(-2, -1)):
  """Resizes the two `axes` of `x` to `size` with separable matrices from `matrix_fn`."""
  ah, aw = (a % x.ndim for a in axes)
  mh = jnp.asarray(matrix_fn(int(size[0]), int(x.shape[ah])))
  mw = jnp.asarray(matrix_fn(int(size[1]), int(x.shape[aw])))
  x = jnp.moveaxis(x, (ah, aw), (-2, -1))
  x = jnp.einsum("oh,...hw->...ow", mh, x.astype(jnp.float32), precision="highest")
  x = jnp.einsum("pw,...ow->...op", mw, x, precision="highest")
  return jnp.moveaxis(x, (-2, -1), (ah, aw))
