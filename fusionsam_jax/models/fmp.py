"""FMP: Fusion Mask Prompting (FusionSAM Sec. 3.2.3, Algorithm 1, Eq. 9-12).

Input: the quantized latents of M >= 2 modalities, I_m^q (B, h, w, d_c) each.

    Alg. 1 step 1   F_m^self = SelfAttention(I_m^q)           ``ModalitySelfAttention``
    Eq. 9           Q_m, K_m, V_m = F_m^self W_{Q,K,V m}       ``QKVProjection`` (qkv_m)
    Eq. 10          z'_m = LN(softmax(Q_m K_n^T / sqrt(d_k)) V_n) + Q_m
                                                              ``CrossDomainAttention`` (cross_m)
    Fusion conv     z_c = conv([z'_1, ..., z'_M])             ``fusion_conv``
    Eq. 11          z_f^q = conv([I_1^q, ..., I_M^q]);  z_0 = mean_m z'_m
                    Q_f = z_f^q W_Q;  K_0, V_0 = z_0 W_K, z_0 W_V
    Eq. 12          I_f = LN(softmax(Q_f K_0^T / sqrt(d_k)) V_0) + z_c
                                                              ``ComplementaryUnit``
    Final conv      fusion = conv(I_f)  (B, h, w, d_c), the "fusion mask"   ``out_conv``

Self-attention runs in (shifted) windows, as in SwinFusion on which the paper bases FMP
(``attention="window"``, ``window_size`` 8; ``"global"``: over the whole map). The
cross-domain and complementary units follow ``cross_attention`` ("window" | "global"; None:
as ``attention``): global, every RGB token sees every thermal token of the map, the
"long-range dependencies between modalities" of Sec. 3.2.3. Global attention uses the
``attn_impl`` kernel: "cudnn" = cuDNN flash attention on GPU (bf16 operands, float32
inputs are cast), "xla" = XLA with ``query_chunk`` queries at a time under remat (never the
whole score matrix). Measured (H100, batch 4, 120 x 160 latents, paper widths, fwd + bwd of
the whole FMP): windowed 9.5 ms, global cuDNN 40.3 ms, global XLA 476 ms
(``benchmarks/results/fmp_attention_h100.json``). Windows: the map is zero-padded up to a multiple of the window and cropped back;
padded tokens are masked out as keys; consecutive self-attention blocks alternate a cyclic
shift of window/2 with the Swin mask that stops tokens attending across the wrapped border.
A dimension no larger than the window gets one window covering it and no shift.

More than two modalities: modality m's queries attend to the concatenation (along the token
axis, within the same window) of the keys / values of all other modalities.

``ConcatFusion`` is ablation B (concatenation + 1x1 conv instead of FMP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from einops import rearrange

from fusionsam_jax.models.layout import FusionModule, register_fusion
from fusionsam_jax.models.sam.common import gelu_erf

Array = jax.Array


# ----------------------------------------------------------------------------- core math

def layer_norm(x: Array, scale: Optional[Array] = None, bias: Optional[Array] = None,
               eps: float = 1e-5) -> Array:
  """LayerNorm over the channel (last) axis with optional affine params (statistics in
  float32; the result has x's dtype)."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


ATTN_IMPLS = ("xla", "cudnn")


def _heads(x: Array, n: int, num_heads: int) -> Array:
  return x.reshape(-1, n, num_heads, x.shape[-1] // num_heads)


def _dpa(qh: Array, kh: Array, vh: Array, scale: float, implementation: str,
         mask: Optional[Array] = None) -> Array:
  """jax.nn.dot_product_attention on (B', N, heads, d) with the requested kernel.

  ``"cudnn"``: the cuDNN fused (flash) kernel, on GPU only and with no mask; it takes
  fp16 / bf16 operands only, so float32 q / k / v are cast to bf16 and the result back to
  q's dtype (softmax statistics stay float32 inside the kernel). Anywhere else (CPU, a
  mask) the XLA lowering, at the operands' dtype.
  """
  if implementation == "cudnn" and mask is None and jax.default_backend() == "gpu":
    dt = qh.dtype if qh.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    out = jax.nn.dot_product_attention(qh.astype(dt), kh.astype(dt), vh.astype(dt),
                                       scale=scale, implementation="cudnn")
    return out.astype(qh.dtype)
  return jax.nn.dot_product_attention(qh, kh, vh, mask=mask, scale=scale)


def multihead_attention(q: Array, k: Array, v: Array, *, num_heads: int = 1,
                        mask: Optional[Array] = None, implementation: str = "xla",
                        query_chunk: Optional[int] = None) -> Array:
  """softmax(Q K^T / sqrt(d_k)) V per head, heads concatenated (no output projection).

  q (..., Nq, C), k / v (..., Nk, C) with the same leading dims; d_k = C / num_heads;
  mask: bool, True = may attend, broadcastable to (..., Nq, Nk). Returns (..., Nq, C).

  implementation: ``"xla"`` or ``"cudnn"`` (see ``_dpa``). query_chunk: with the XLA
  kernel and no mask, queries are processed ``query_chunk`` at a time (``lax.map`` over
  rematerialised chunks), so the (heads, Nq, Nk) score matrix is never held whole: at
  MFNet's 120 x 160 latents (Nq = Nk = 19 200, 4 heads) it would be 5.9 GB per image in
  float32, forward alone. Same values as the unchunked formula.
  """
  if implementation not in ATTN_IMPLS:
    raise ValueError(f"implementation must be one of {ATTN_IMPLS}, got {implementation!r}")
  lead, (nq, c), nk = q.shape[:-2], q.shape[-2:], k.shape[-2]
  if c % num_heads:
    raise ValueError(f"channels {c} not divisible by num_heads {num_heads}")
  dh = c // num_heads
  scale = 1.0 / math.sqrt(dh)
  cv = v.shape[-1]
  qh, kh, vh = _heads(q, nq, num_heads), _heads(k, nk, num_heads), _heads(v, nk, num_heads)
  m = None
  if mask is not None:
    m = jnp.broadcast_to(jnp.asarray(mask, bool), lead + (nq, nk)).reshape(-1, 1, nq, nk)
  cudnn = implementation == "cudnn" and m is None and jax.default_backend() == "gpu"
  if m is None and not cudnn and query_chunk is not None and nq > query_chunk:
    n_chunks = -(-nq // query_chunk)
    pad = n_chunks * query_chunk - nq
    qc = jnp.pad(qh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qc.reshape(qh.shape[0], n_chunks, query_chunk, num_heads, dh), 1, 0)
    one = jax.checkpoint(lambda qi: _dpa(qi, kh, vh, scale, "xla"))
    out = jnp.moveaxis(jax.lax.map(one, qc), 0, 1)
    out = out.reshape(qh.shape[0], n_chunks * query_chunk, num_heads, -1)[:, :nq]
  else:
    out = _dpa(qh, kh, vh, scale, implementation, m)
  return out.reshape(lead + (nq, cv))


def cross_domain_attention(q: Array, k: Array, v: Array, *, num_heads: int = 1,
                           mask: Optional[Array] = None, residual: Optional[Array] = None,
                           ln_scale: Optional[Array] = None, ln_bias: Optional[Array] = None,
                           eps: float = 1e-5, implementation: str = "xla",
                           query_chunk: Optional[int] = None) -> Array:
  """Eq. 10 (and Eq. 12) on tokens: ``LN(softmax(Q K^T / sqrt(d_k)) V) + R``.

  q (..., Nq, C) already projected (Q = X W_Q), k / v (..., Nk, C); R = ``residual`` if
  given (Eq. 12: z_c) else q (Eq. 10: Q_1). LN is over the C channels of the concatenated
  heads, with optional affine ``ln_scale`` / ``ln_bias`` (C,). ``implementation`` /
  ``query_chunk``: see ``multihead_attention``.
  """
  a = multihead_attention(q, k, v, num_heads=num_heads, mask=mask,
                          implementation=implementation, query_chunk=query_chunk)
  return layer_norm(a, ln_scale, ln_bias, eps) + (q if residual is None else residual)


# ----------------------------------------------------------------------------- windows

@dataclasses.dataclass(frozen=True)
class WindowPlan:
  h: int            # map size
  w: int
  wh: int           # window size (per dim)
  ww: int
  sh: int           # cyclic shift (per dim)
  sw: int
  hp: int           # padded size
  wp: int


def window_plan(h: int, w: int, window_size: Optional[int], shift: bool) -> WindowPlan:
  """``window_size=None`` -> one window over the whole map (global attention)."""
  if window_size is None:
    return WindowPlan(h, w, h, w, 0, 0, h, w)
  if window_size < 1:
    raise ValueError(f"window_size must be >= 1, got {window_size}")
  wh, ww = min(window_size, h), min(window_size, w)
  sh = wh // 2 if (shift and h > window_size) else 0
  sw = ww // 2 if (shift and w > window_size) else 0
  return WindowPlan(h, w, wh, ww, sh, sw, -(-h // wh) * wh, -(-w // ww) * ww)


def to_windows(x: Array, p: WindowPlan) -> Array:
  """(B, h, w, C) -> (B, nW, wh*ww, C): pad, cyclic shift by (-sh, -sw), partition."""
  if (p.hp, p.wp) != (p.h, p.w):
    x = jnp.pad(x, ((0, 0), (0, p.hp - p.h), (0, p.wp - p.w), (0, 0)))
  if p.sh or p.sw:
    x = jnp.roll(x, (-p.sh, -p.sw), axis=(1, 2))
  return rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=p.wh, ww=p.ww)


def from_windows(x: Array, p: WindowPlan) -> Array:
  """Inverse of ``to_windows``: (B, nW, wh*ww, C) -> (B, h, w, C)."""
  x = rearrange(x, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                nh=p.hp // p.wh, wh=p.wh, ww=p.ww)
  if p.sh or p.sw:
    x = jnp.roll(x, (p.sh, p.sw), axis=(1, 2))
  return x[:, :p.h, :p.w]


def window_mask(p: WindowPlan) -> Optional[np.ndarray]:
  """Bool (nW, N, N), True = may attend; None when nothing needs masking.

  Masks (a) pairs in different regions of a shifted window (tokens wrapped round the
  border by the cyclic shift), (b) padded key tokens. Static (numpy) from the shapes.
  """
  if not (p.sh or p.sw) and (p.hp, p.wp) == (p.h, p.w):
    return None

  def slices(n, win, s):
    return ((slice(0, n),) if s == 0 else
            (slice(0, n - win), slice(n - win, n - s), slice(n - s, n)))

  region = np.zeros((p.hp, p.wp), np.int32)
  cnt = 0
  for hs in slices(p.hp, p.wh, p.sh):
    for ws in slices(p.wp, p.ww, p.sw):
      region[hs, ws] = cnt
      cnt += 1
  valid = np.zeros((p.hp, p.wp), bool)
  valid[:p.h, :p.w] = True
  valid = np.roll(valid, (-p.sh, -p.sw), axis=(0, 1))   # region is already in shifted coords

  def part(a):
    return rearrange(a, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=p.wh, ww=p.ww)

  region, valid = part(region), part(valid)
  return (region[:, :, None] == region[:, None, :]) & valid[:, None, :]


def apply_windowed(core: Callable, q: Array, ks: Sequence[Array], vs: Sequence[Array], *,
                   window_size: Optional[int], shift: bool = False,
                   residual: Optional[Array] = None) -> Array:
  """Run a token-level attention ``core(qw, kw, vw, mask, rw)`` in (shifted) windows.

  q / residual (B, h, w, C); ks / vs: sequences of (B, h, w, C) maps whose window tokens
  are concatenated along the token axis (window mask tiled to match). Returns (B, h, w, C').
  """
  p = window_plan(q.shape[1], q.shape[2], window_size, shift)
  qw = to_windows(q, p)                                            # (B, nW, N, C)
  kw = jnp.concatenate([to_windows(k, p) for k in ks], axis=-2)    # (B, nW, n*N, C)
  vw = jnp.concatenate([to_windows(v, p) for v in vs], axis=-2)
  rw = None if residual is None else to_windows(residual, p)
  mask = window_mask(p)
  if mask is not None:
    mask = jnp.asarray(np.concatenate([mask] * len(ks), axis=-1))  # (nW, N, n*N)
  return from_windows(core(qw, kw, vw, mask, rw), p)


def apply_global(core: Callable, q: Array, ks: Sequence[Array], vs: Sequence[Array], *,
                 residual: Optional[Array] = None) -> Array:
  """``core(qt, kt, vt, None, rt)`` over the whole map: q / residual (B, h, w, C) as
  (B, h*w, C) tokens, the maps of ``ks`` / ``vs`` concatenated along the token axis."""
  b, h, w, _ = q.shape

  def flat(x):
    return x.reshape(b, h * w, x.shape[-1])
  kt = jnp.concatenate([flat(k) for k in ks], axis=-2)
  vt = jnp.concatenate([flat(v) for v in vs], axis=-2)
  out = core(flat(q), kt, vt, None, None if residual is None else flat(residual))
  return out.reshape(b, h, w, out.shape[-1])


def window_attention(q: Array, k: Array, v: Array, *, num_heads: int = 1,
                     window_size: Optional[int] = 8, shift: bool = False,
                     implementation: str = "xla", query_chunk: Optional[int] = None) -> Array:
  """Plain multi-head attention in (shifted) windows on maps (B, h, w, C);
  ``window_size=None``: over the whole map (``implementation`` / ``query_chunk`` as in
  ``multihead_attention``)."""
  def core(qw, kw, vw, mask, _):
    return multihead_attention(qw, kw, vw, num_heads=num_heads, mask=mask,
                               implementation=implementation, query_chunk=query_chunk)
  if window_size is None:
    return apply_global(core, q, [k], [v])
  return apply_windowed(core, q, [k], [v], window_size=window_size, shift=shift)


# ----------------------------------------------------------------------------- modules

class MLP(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # The fast erf form in every dtype: FMP has no official float32 model to match.
    x = gelu_erf(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(self.out, name="fc2")(x)


class SwinBlock(nn.Module):
  """LN -> (shifted-)window MSA -> residual; LN -> MLP -> residual. (B,h,w,C) -> same."""

  num_heads: int
  window_size: Optional[int]
  shift: bool = False
  mlp_ratio: float = 2.0
  attn_impl: str = "xla"
  query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = nn.LayerNorm(name="norm1")(x)
    q, k, v = jnp.split(nn.Dense(3 * c, name="qkv")(h), 3, axis=-1)
    a = window_attention(q, k, v, num_heads=self.num_heads,
                         window_size=self.window_size, shift=self.shift,
                         implementation=self.attn_impl, query_chunk=self.query_chunk)
    x = x + nn.Dense(c, name="proj")(a)
    h = nn.LayerNorm(name="norm2")(x)
    return x + MLP(int(c * self.mlp_ratio), c, name="mlp")(h)


class ModalitySelfAttention(nn.Module):
  """Algorithm 1 step 1 for one modality: (B, h, w, d_c) -> F^self (B, h, w, dim).

  1x1 projection to ``dim`` (``in_proj``), optional depthwise 3x3 conv positional
  encoding (``pos_conv``, residual), then ``depth`` Swin blocks alternating shift.
  """

  dim: int
  depth: int = 2
  num_heads: int = 4
  window_size: Optional[int] = 8
  mlp_ratio: float = 2.0
  pos_conv: bool = True
  attn_impl: str = "xla"
  query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, z: Array) -> Array:
    x = nn.Dense(self.dim, name="in_proj")(z)
    if self.pos_conv:
      x = x + nn.Conv(self.dim, (3, 3), padding=1, feature_group_count=self.dim,
                      name="pos_conv")(x)
    for i in range(self.depth):
      x = SwinBlock(self.num_heads, self.window_size, shift=(i % 2 == 1),
                    mlp_ratio=self.mlp_ratio, attn_impl=self.attn_impl,
                    query_chunk=self.query_chunk, name=f"block_{i}")(x)
    return x


class QKVProjection(nn.Module):
  """Eq. 9 for one modality: {Q, K, V} = X {W_Q, W_K, W_V} (no bias)."""

  dim: int

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    return (nn.Dense(self.dim, use_bias=False, name="W_Q")(x),
            nn.Dense(self.dim, use_bias=False, name="W_K")(x),
            nn.Dense(self.dim, use_bias=False, name="W_V")(x))


class CrossDomainAttention(nn.Module):
  """Eq. 10 given projected Q (B,h,w,C) and K / V maps (one per other modality).

  Holds only the LN affine params (``ln_scale``, ``ln_bias``); the projections are the
  modalities' ``QKVProjection``. ``residual`` replaces Q in the sum (Eq. 12 uses z_c).
  ``window_size=None``: every query attends to every key of the map (global; the
  ``attn_impl`` kernel, ``query_chunk`` queries at a time with XLA).
  """

  num_heads: int = 4
  window_size: Optional[int] = 8
  shift: bool = False
  eps: float = 1e-5
  attn_impl: str = "xla"
  query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, q: Array, ks: Sequence[Array], vs: Sequence[Array],
               residual: Optional[Array] = None) -> Array:
    c = q.shape[-1]
    scale = self.param("ln_scale", nn.initializers.ones, (c,))
    bias = self.param("ln_bias", nn.initializers.zeros, (c,))

    def core(qw, kw, vw, mask, rw):
      return cross_domain_attention(qw, kw, vw, num_heads=self.num_heads, mask=mask,
                                    residual=rw, ln_scale=scale, ln_bias=bias,
                                    eps=self.eps, implementation=self.attn_impl,
                                    query_chunk=self.query_chunk)
    if self.window_size is None:
      return apply_global(core, q, ks, vs, residual=residual)
    return apply_windowed(core, q, ks, vs, window_size=self.window_size,
                          shift=self.shift, residual=residual)


class ComplementaryUnit(nn.Module):
  """Eq. 11-12: I_f = LN(softmax(Q_f K_0^T / sqrt(d_k)) V_0) + z_c.

  Q_f = z_f^q W_Q, K_0 = z_0 W_K, V_0 = z_0 W_V (own weights, no bias). (B,h,w,C) maps.
  """

  num_heads: int = 4
  window_size: Optional[int] = 8
  eps: float = 1e-5
  attn_impl: str = "xla"
  query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, z_f_q: Array, z_0: Array, z_c: Array) -> Array:
    c = z_c.shape[-1]
    q_f = nn.Dense(c, use_bias=False, name="W_Q")(z_f_q)
    k_0 = nn.Dense(c, use_bias=False, name="W_K")(z_0)
    v_0 = nn.Dense(c, use_bias=False, name="W_V")(z_0)
    return CrossDomainAttention(self.num_heads, self.window_size, eps=self.eps,
                                attn_impl=self.attn_impl, query_chunk=self.query_chunk,
                                name="attn")(q_f, [k_0], [v_0], residual=z_c)


def _check_latents(latents: Sequence[Array], min_m: int = 2) -> None:
  if len(latents) < min_m:
    raise ValueError(f"need at least {min_m} modality latents, got {len(latents)}")
  s0 = latents[0].shape
  if len(s0) != 4:
    raise ValueError(f"latents must be (B, h, w, d_c), got {s0}")
  for i, z in enumerate(latents):
    if z.shape != s0:
      raise ValueError(f"latent {i} has shape {z.shape}, expected {s0} like latent 0")


class FusionMaskPrompting(nn.Module):
  """FMP (Algorithm 1, Eq. 9-12) on M >= 2 quantized latents (B, h, w, d_c) each.

  ``__call__(latents)`` returns a dict:
      fusion         (B, h, w, out_dim)  the fusion representation ("fusion mask")
      z_c            (B, h, w, dim)      fusion conv over [z'_1..z'_M]
      I_f            (B, h, w, dim)      Eq. 12
      z_prime        tuple of M (B, h, w, dim)   Eq. 10
      z_f_q, z_0     (B, h, w, dim)      Eq. 11 inputs
      self_features  tuple of M (B, h, w, dim)   Algorithm 1 step 1
  Param tree: self_attn_{m}, qkv_{m}, cross_{m} (m = 1..M), fusion_conv,
  latent_fusion_conv, complementary, out_conv.
  """

  dim: Optional[int] = None        # internal width C; None -> d_c of the inputs
  out_dim: Optional[int] = None    # None -> d_c of the inputs
  num_heads: int = 4
  depth_self: int = 2              # Swin blocks per modality (alternating shift)
  window_size: int = 8
  attention: str = "window"        # self-attention (Alg. 1 step 1): "window" | "global"
  # Cross-domain (Eq. 9-10) and complementary (Eq. 11-12) units: "window" | "global";
  # None: as `attention`.
  cross_attention: Optional[str] = None
  # Heads of the cross-domain and complementary units; None: ``num_heads``. Global attention's
  # softmax work grows with the heads at a fixed width: at 120 x 160, batch 4, bf16 on an
  # H200 the FMP's forward + backward takes 38.6 ms with 4 heads, 14.1 ms with 1
  # (benchmarks/results/fmp_attention_heads_bf16_h200.json).
  cross_num_heads: Optional[int] = None
  attn_impl: str = "xla"           # global attention kernel: "xla" | "cudnn" (GPU, bf16)
  query_chunk: Optional[int] = 1024  # XLA global attention: queries per chunk (None: all)
  mlp_ratio: float = 2.0
  pos_conv: bool = True
  fusion_kernel: int = 3           # kernel of fusion_conv / latent_fusion_conv / out_conv
  eps: float = 1e-5

  @nn.compact
  def __call__(self, latents: Sequence[Array]) -> dict:
    latents = list(latents)
    _check_latents(latents)
    cross = self.attention if self.cross_attention is None else self.cross_attention
    for key, val in (("attention", self.attention), ("cross_attention", cross)):
      if val not in ("window", "global"):
        raise ValueError(f"{key} must be 'window' or 'global', got {val!r}")
    if self.attn_impl not in ATTN_IMPLS:
      raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
    ws = self.window_size if self.attention == "window" else None
    wc = self.window_size if cross == "window" else None
    kw = dict(attn_impl=self.attn_impl, query_chunk=self.query_chunk)
    heads_c = self.cross_num_heads or self.num_heads
    d_c = latents[0].shape[-1]
    c = self.dim or d_c
    m_count = len(latents)
    k = self.fusion_kernel
    pad = k // 2

    def conv(out, name):
      return nn.Conv(out, (k, k), padding=pad, name=name)

    feats = [ModalitySelfAttention(c, self.depth_self, self.num_heads, ws, self.mlp_ratio,
                                   self.pos_conv, **kw, name=f"self_attn_{m + 1}")(z)
             for m, z in enumerate(latents)]                          # (B,h,w,C) each
    qkv = [QKVProjection(c, name=f"qkv_{m + 1}")(f) for m, f in enumerate(feats)]  # Eq. 9
    z_prime = []
    for m in range(m_count):                                          # Eq. 10
      others = [n for n in range(m_count) if n != m]
      z_prime.append(CrossDomainAttention(heads_c, wc, eps=self.eps, **kw,
                                          name=f"cross_{m + 1}")(
          qkv[m][0], [qkv[n][1] for n in others], [qkv[n][2] for n in others]))
    z_c = nn.leaky_relu(conv(c, "fusion_conv")(jnp.concatenate(z_prime, -1)), 0.2)
    z_f_q = nn.leaky_relu(conv(c, "latent_fusion_conv")(jnp.concatenate(latents, -1)), 0.2)
    z_0 = sum(z_prime) / m_count
    i_f = ComplementaryUnit(heads_c, wc, self.eps, **kw, name="complementary")(
        z_f_q, z_0, z_c)                                              # Eq. 11-12
    fusion = conv(self.out_dim or d_c, "out_conv")(i_f)               # (B,h,w,d_c)
    return dict(fusion=fusion, z_c=z_c, I_f=i_f, z_prime=tuple(z_prime), z_f_q=z_f_q,
                z_0=z_0, self_features=tuple(feats))


class ConcatFusion(nn.Module):
  """Ablation B: concatenate the M latents along channels + 1x1 conv -> (B, h, w, d_c).

  Returns ``dict(fusion=...)`` like ``FusionMaskPrompting``. Param tree: ``conv``.
  """

  out_dim: Optional[int] = None

  @nn.compact
  def __call__(self, latents: Sequence[Array]) -> dict:
    latents = list(latents)
    _check_latents(latents, min_m=1)  # one latent: the single-modality variants
    out = self.out_dim or latents[0].shape[-1]
    return dict(fusion=nn.Conv(out, (1, 1), name="conv")(jnp.concatenate(latents, -1)))


def _make_fmp(model) -> FusionMaskPrompting:
  kwargs = dict(model.fusion_kwargs)
  # FMP's global attention takes the model's kernel choice (cuDNN flash on GPU).
  kwargs.setdefault("attn_impl", "cudnn" if model.attn_impl.startswith("cudnn") else "xla")
  return FusionMaskPrompting(**kwargs)


# model.fusion = "fmp" (options: config.model.fmp; one modality: "concat") | "concat".
register_fusion(FusionModule("fmp", "fmp", _make_fmp, min_modalities=2, fallback="concat",
                             options="fmp"))
register_fusion(FusionModule("concat", "concat_fusion", lambda model: ConcatFusion()))
