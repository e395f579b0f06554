"""SAM's ViT image encoder (port of `segment_anything.modeling.image_encoder`).

Channels-last throughout: input (B, 1024, 1024, 3) normalised pixels, output
(B, 64, 64, 256) image embeddings. Module and parameter names follow SAM's, so a
converted checkpoint is a plain tree walk (`blocks.3.attn.qkv` -> `blocks_3/attn/qkv`).

Two attention implementations compute the same function:
- ``"xla"``: the explicit formula (scores + decomposed relative position bias, softmax),
  the reference path used for parity with PyTorch at float32.
- ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")`, the cuDNN fused
  (flash) kernel; GPU and bf16/fp16 only. Where there is no GPU backend (a GPU-trained run
  evaluated on a CPU) it falls back to ``"xla"``, with one `AttentionFallbackWarning`. ``"fused"`` is the same computation through
  dot_product_attention's XLA lowering (any backend; what the CPU tests check).
  The decomposed relative-position bias is folded into augmented query/key vectors, so the
  fused kernel needs no (B, heads, N, N) bias tensor:
  q.k*s + q.Rh[qh,kh] + q.Rw[qw,kw] = s * [q, (q.Rh)/s, (q.Rw)/s] . [k, onehot(kh), onehot(kw)].
- ``"cudnn_bias"`` / ``"fused_bias"``: the same with the bias materialised instead.
  ``"cudnn"`` uses the materialised bias in windowed blocks (196 x 196 per window, measured
  faster there) and the folded q / k in the global blocks (a 4096 x 4096 bias per head is not).
"""

import math
import warnings
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dpa

from fusionsam_jax.models.sam.common import LayerNorm2d, MLPBlock

Dtype = Any


def window_partition(x, window_size: int):
  """(B, H, W, C) -> ((B * nW, ws, ws, C), (Hp, Wp)), zero-padding H, W up to the window."""
  b, h, w, c = x.shape
  pad_h = (window_size - h % window_size) % window_size
  pad_w = (window_size - w % window_size) % window_size
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
  return x, (hp, wp)


def window_unpartition(windows, window_size: int, pad_hw, hw):
  """Inverse of `window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C)."""
  hp, wp = pad_hw
  h, w = hw
  b = windows.shape[0] // (hp * wp // window_size // window_size)
  x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :h, :w, :]


def get_rel_pos(q_size: int, k_size: int, rel_pos):
  """Relative position embeddings for every (query, key) offset: (q_size, k_size, C).

  Resizes the table linearly (as `F.interpolate(mode="linear")`) when its length differs
  from 2 * max(q_size, k_size) - 1.
  """
  max_rel_dist = int(2 * max(q_size, k_size) - 1)
  if rel_pos.shape[0] != max_rel_dist:
    rel_pos = jax.image.resize(rel_pos, (max_rel_dist, rel_pos.shape[1]), "linear",
                               antialias=False)
  q_coords = jnp.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = jnp.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return rel_pos[rel.astype(jnp.int32)]


# attn_impl -> `implementation` of jax.nn.dot_product_attention (None: its XLA lowering).
_BACKEND = {"fused": None, "fused_bias": None, "cudnn": "cudnn", "cudnn_bias": "cudnn"}


class AttentionFallbackWarning(UserWarning):
  """cuDNN attention was configured, but this machine has no GPU backend: XLA is used."""


_FALLBACK_WARNED = False


def cudnn_available() -> bool:
  """Whether cuDNN fused attention can run here (JAX's default backend is a GPU)."""
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:  # no backend could be initialised at all
    return False


def resolve_attn_impl(attn_impl: str) -> str:
  """The attention implementation to run: ``attn_impl``, except that the cuDNN ones become
  ``"xla"`` where cuDNN is absent (a run trained on a GPU, evaluated on a CPU). Warns once
  per process (`AttentionFallbackWarning`)."""
  global _FALLBACK_WARNED
  if attn_impl not in ("cudnn", "cudnn_bias") or cudnn_available():
    return attn_impl
  if not _FALLBACK_WARNED:
    _FALLBACK_WARNED = True
    warnings.warn(
        f"attn_impl={attn_impl!r} needs cuDNN, which this machine does not have (JAX backend "
        f"{jax.default_backend()!r}): using XLA attention instead (same function, slower; "
        "set model.attn_impl to 'xla' to silence this)", AttentionFallbackWarning,
        stacklevel=1)
  return "xla"


def _fold_rel_pos(q, k, v, rel_h, rel_w, scale):
  """Folds the decomposed rel-pos bias into augmented q / k for a fused attention kernel.

  q, k, v: (B, N, nh, hd); rel_h: (B, nh, h, w, kh); rel_w: (B, nh, h, w, kw).
  s * q'.k' = s * q.k + rel_h[q, kh(k)] + rel_w[q, kw(k)] with
  q' = [q, rel_h / s, rel_w / s] and k' = [k, onehot(kh), onehot(kw)]; head dims are
  zero-padded to a multiple of 8; v keeps its width (see `_attention`).
  """
  b, n, nh, hd = q.shape
  _, _, h, w, kh = rel_h.shape
  kw = rel_w.shape[-1]
  rel_h = rel_h.transpose(0, 2, 3, 1, 4).reshape(b, n, nh, kh) / scale
  rel_w = rel_w.transpose(0, 2, 3, 1, 4).reshape(b, n, nh, kw) / scale
  kpos_h = jnp.repeat(jnp.arange(kh), kw)  # row of each key token
  kpos_w = jnp.tile(jnp.arange(kw), kh)  # column of each key token
  onehots = jnp.concatenate([jax.nn.one_hot(kpos_h, kh, dtype=k.dtype),
                             jax.nn.one_hot(kpos_w, kw, dtype=k.dtype)], -1)  # (N, kh + kw)
  d = hd + kh + kw
  d_pad = -d % 8
  q = jnp.concatenate([q, rel_h.astype(q.dtype), rel_w.astype(q.dtype),
                       jnp.zeros((b, n, nh, d_pad), q.dtype)], -1)
  k = jnp.concatenate([k, jnp.broadcast_to(onehots[None, :, None, :], (b, n, nh, kh + kw)),
                       jnp.zeros((b, n, nh, d_pad), k.dtype)], -1)
  return q, k, v


def _attention(q, k, v, scale, implementation):
  """dot_product_attention where v may be narrower than q / k (B, N, nh, d_v) output.

  cuDNN on Hopper computes that directly (multi-head-latent-attention support), but
  `jax.nn.dot_product_attention` insists on equal widths; so for cuDNN try JAX's cuDNN
  entry point first and otherwise zero-pad v (the padded output columns are dropped).
  """
  d_v = v.shape[-1]
  if d_v != q.shape[-1] and implementation == "cudnn":
    try:
      return cudnn_dpa(q, k, v, scale=scale)
    except Exception:  # private API moved, or this cuDNN / GPU refuses d_q != d_v
      pass
  if d_v != q.shape[-1]:
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - d_v)))
  return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                      implementation=implementation)[..., :d_v]


class Attention(nn.Module):
  """Multi-head attention with decomposed relative position bias (SAM's `Attention`)."""

  dim: int
  num_heads: int = 8
  qkv_bias: bool = True
  use_rel_pos: bool = False
  input_size: Optional[Tuple[int, int]] = None
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"

  window_size: int = 0

  @nn.compact
  def __call__(self, x):  # (B, H, W, dim)
    """Global attention (window_size 0) or attention within zero-padded windows.

    SAM pads the normalised tokens with zeros, partitions, then projects. Projecting first
    and padding the projections with qkv(0) (the layer's own output for a zero token) gives
    the same values without spending the qkv / proj matmuls on padding tokens.
    """
    qkv_layer = nn.Dense(self.dim * 3, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")
    qkv = qkv_layer(x)  # (B, H, W, 3 * dim)
    hw_in = x.shape[1:3]
    if self.window_size > 0:
      ws = self.window_size
      bx, hx, wx, c3 = qkv.shape
      hp, wp = -(-hx // ws) * ws, -(-wx // ws) * ws
      if (hp, wp) != (hx, wx):
        fill = qkv_layer(jnp.zeros((1, 1, 1, x.shape[-1]), x.dtype))  # qkv of a zero token
        qkv = jnp.broadcast_to(fill, (bx, hp, wp, c3)).at[:, :hx, :wx].set(qkv)
      qkv, pad_hw = window_partition(qkv, ws)  # (B * nW, ws, ws, 3 * dim)
    out = self._attend(qkv)
    if self.window_size > 0:
      out = window_unpartition(out, self.window_size, pad_hw, hw_in)
    return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out)

  def _attend(self, qkv):  # (B, h, w, 3 * dim) -> (B, h, w, dim)
    b, h, w, _ = qkv.shape
    nh = self.num_heads
    hd = self.dim // nh
    scale = hd ** -0.5
    qkv = qkv.reshape(b, h * w, 3, nh, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, nh, hd)
    rel_h = rel_w = None
    if self.use_rel_pos:
      assert self.input_size is not None, "input_size is needed for relative positions"
      rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros,
                             (2 * self.input_size[0] - 1, hd))
      rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros,
                             (2 * self.input_size[1] - 1, hd))
      rh = get_rel_pos(h, h, rel_pos_h).astype(q.dtype)  # (h, kh, hd)
      rw = get_rel_pos(w, w, rel_pos_w).astype(q.dtype)  # (w, kw, hd)
      r_q = q.reshape(b, h, w, nh, hd)
      rel_h = jnp.einsum("bhwnc,hkc->bnhwk", r_q, rh)  # (B, nh, h, w, kh)
      rel_w = jnp.einsum("bhwnc,wkc->bnhwk", r_q, rw)  # (B, nh, h, w, kw)

    impl = resolve_attn_impl(self.attn_impl)
    if impl == "xla":
      attn = jnp.einsum("bqnc,bknc->bnqk", q * scale, k)  # (B, nh, N, N)
      if rel_h is not None:
        attn = (attn.reshape(b, nh, h, w, h, w) + rel_h[..., :, None]
                + rel_w[..., None, :]).reshape(b, nh, h * w, h * w)
      attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bnqk,bknc->bqnc", attn, v)
    elif impl in ("fused_bias", "cudnn_bias") or (
        impl in ("fused", "cudnn") and self.window_size > 0):
      bias = None
      if rel_h is not None:  # materialised (B, nh, N, N) bias
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, nh, h * w, h * w)
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype), scale=scale,
          implementation=_BACKEND[impl])
    elif impl in ("fused", "cudnn"):
      if rel_h is not None:
        q, k, v = _fold_rel_pos(q, k, v, rel_h, rel_w, scale)
      out = _attention(q, k, v, scale, _BACKEND[impl])
    else:
      raise ValueError(f"attn_impl must be one of {sorted(_BACKEND)} or 'xla', "
                       f"got {self.attn_impl!r}")
    return out.reshape(b, h, w, self.dim)


class Block(nn.Module):
  """Pre-norm ViT block, windowed (window_size > 0) or global attention (SAM's `Block`)."""

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  use_rel_pos: bool = False
  window_size: int = 0
  input_size: Optional[Tuple[int, int]] = None
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x):  # (B, H, W, dim)
    shortcut = x
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    x = Attention(
        self.dim, self.num_heads, self.qkv_bias, self.use_rel_pos,
        self.input_size if self.window_size == 0 else (self.window_size, self.window_size),
        dtype=self.dtype, attn_impl=self.attn_impl, window_size=self.window_size,
        name="attn")(x)
    x = shortcut + x
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    return x + MLPBlock(self.dim, int(self.dim * self.mlp_ratio), dtype=self.dtype,
                        name="mlp")(y)


class PatchEmbed(nn.Module):
  """Non-overlapping patch embedding conv (SAM's `PatchEmbed`)."""

  patch_size: int = 16
  embed_dim: int = 768
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, 3) -> (B, H/p, W/p, embed_dim)
    p = self.patch_size
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   name="proj")(x)


class ImageEncoderViT(nn.Module):
  """SAM's image encoder: ViT with windowed + global blocks and a conv neck to out_chans."""

  img_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  qkv_bias: bool = True
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, x):  # (B, img_size, img_size, 3)
    grid = self.img_size // self.patch_size
    x = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype, name="patch_embed")(x)
    if self.use_abs_pos:
      pos_embed = self.param("pos_embed", nn.initializers.zeros,
                             (1, grid, grid, self.embed_dim))
      x = x + pos_embed.astype(x.dtype)
    block_cls = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(
          dim=self.embed_dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias, use_rel_pos=self.use_rel_pos,
          window_size=0 if i in self.global_attn_indexes else self.window_size,
          input_size=(grid, grid), dtype=self.dtype, attn_impl=self.attn_impl,
          name=f"blocks_{i}")(x)
    x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(x)
    x = LayerNorm2d(name="neck_1")(x)
    x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                dtype=self.dtype, name="neck_2")(x)
    x = LayerNorm2d(name="neck_3")(x)
    return x  # (B, grid, grid, out_chans)
