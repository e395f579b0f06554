"""SAM 2's Hiera trunk (port of `sam2.modeling.backbones.hieradet`).

Channels-last throughout: input (B, S, S, 3) normalised pixels, output one feature map per
stage, (B, S/4, S/4, C), (B, S/8, S/8, 2C), (B, S/16, S/16, 4C), (B, S/32, S/32, 8C).
Module and parameter names follow `sam2`'s (`blocks.3.attn.qkv` -> `blocks_3/attn/qkv`,
`mlp.layers.0` -> `mlp/layers_0`), so conversion is a tree walk. `pos_embed` and
`pos_embed_window` keep PyTorch's (1, C, h, w) layout.

Attention is plain softmax attention inside windows (padded with zeros to a multiple of the
window, the padding taking part as keys, as in `sam2`) or over the whole map in the global
blocks. The first block of stages 2-4 max-pools its queries 2x2 (per window), halving the
resolution and widening the channels (the shortcut goes through a Linear and the same pool).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.common import gelu
from fusionsam_jax.models.sam2.interp import bicubic_matrix, resize_2d

Dtype = Any


def window_partition(x, window_size: int):
  """(B, H, W, C) -> (B * nW, ws, ws, C) zero-padded windows, and the padded (Hp, Wp)."""
  b, h, w, c = x.shape
  ph, pw = (-h) % window_size, (-w) % window_size
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows, window_size: int, pad_hw, hw):
  """Inverse of `window_partition`, dropping the padding: -> (B, H, W, C)."""
  hp, wp = pad_hw
  h, w = hw
  b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
  x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :h, :w, :]


def max_pool(x, stride: Tuple[int, int]):
  """`nn.MaxPool2d(kernel=stride, stride=stride)` (floor mode) on (B, H, W, C)."""
  return nn.max_pool(x, stride, strides=stride, padding="VALID")


#: ``attn_impl="auto"``: cuDNN flash attention from this many keys on (stage 3's 14 x 14
#: windows, the global blocks), XLA's batched matmuls below it (the 4 x 4, 7 x 7 and 8 x 8
#: windows, shorter than one of the flash kernel's 64 / 128-token tiles).
AUTO_CUDNN_MIN_KEYS = 128


def _attention(q, k, v, implementation: str):
  """Softmax attention, (B, N, heads, d) each, scale 1/sqrt(d). ``implementation``: "xla",
  "cudnn", "fused" (JAX's choice) or "auto" (by sequence length; XLA off the GPU)."""
  if implementation == "auto":
    implementation = ("cudnn" if jax.default_backend() == "gpu"
                      and k.shape[1] >= AUTO_CUDNN_MIN_KEYS else "xla")
  if implementation == "xla":
    d = q.shape[-1]
    s = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", p, v)
  impl = None if implementation == "fused" else implementation
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class MultiScaleAttention(nn.Module):
  """qkv -> (optional q max-pool) -> attention -> proj, on (B, H, W, dim) windows."""

  dim: int
  dim_out: int
  num_heads: int
  q_stride: Optional[Tuple[int, int]] = None
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x):  # (B, H, W, dim) -> (B, H', W', dim_out)
    b, h, w, _ = x.shape
    qkv = nn.Dense(3 * self.dim_out, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, h * w, 3, self.num_heads, self.dim_out // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_stride:
      q = max_pool(q.reshape(b, h, w, self.dim_out), self.q_stride)
      h, w = q.shape[1:3]
      q = q.reshape(b, h * w, self.num_heads, -1)
    out = _attention(q, k, v, self.attn_impl).reshape(b, h, w, self.dim_out)
    return nn.Dense(self.dim_out, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  """`sam2`'s MLP(num_layers=2, GELU): layers_0 -> GELU -> layers_1."""

  hidden_dim: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="layers_0")(x))
    return nn.Dense(self.output_dim, dtype=self.dtype, name="layers_1")(x)


class MultiScaleBlock(nn.Module):
  """Hiera block: LN -> (windowed) attention [+ q-pool] -> residual -> LN -> MLP -> residual."""

  dim: int
  dim_out: int
  num_heads: int
  mlp_ratio: float = 4.0
  q_stride: Optional[Tuple[int, int]] = None
  window_size: int = 0
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x):  # (B, H, W, dim) -> (B, H', W', dim_out)
    ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     use_fast_variance=False, name=name)
    shortcut = x
    x = ln("norm1")(x)
    if self.dim != self.dim_out:
      shortcut = nn.Dense(self.dim_out, dtype=self.dtype, name="proj")(x)
      if self.q_stride:
        shortcut = max_pool(shortcut, self.q_stride)
    ws = self.window_size
    if ws > 0:
      h, w = x.shape[1:3]
      x, pad_hw = window_partition(x, ws)
    x = MultiScaleAttention(self.dim, self.dim_out, self.num_heads, self.q_stride,
                            dtype=self.dtype, attn_impl=self.attn_impl, name="attn")(x)
    if self.q_stride:
      ws = self.window_size // self.q_stride[0]
      h, w = shortcut.shape[1:3]
      pad_hw = (h + (-h) % ws, w + (-w) % ws) if ws > 0 else (h, w)
    if self.window_size > 0:
      x = window_unpartition(x, ws, pad_hw, (h, w))
    x = shortcut + x
    mlp = Mlp(int(self.dim_out * self.mlp_ratio), self.dim_out, dtype=self.dtype, name="mlp")
    return x + mlp(ln("norm2")(x))


class PatchEmbed(nn.Module):
  """Conv 7x7, stride 4, padding 3: (B, S, S, 3) -> (B, S/4, S/4, embed_dim)."""

  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.embed_dim, (7, 7), strides=(4, 4), padding=((3, 3), (3, 3)),
                   dtype=self.dtype, name="proj")(x)


class Hiera(nn.Module):
  """Hiera with windowed absolute position embeddings (`sam2`'s `Hiera`)."""

  embed_dim: int = 96
  num_heads: int = 1
  q_pool: int = 3
  q_stride: Tuple[int, int] = (2, 2)
  stages: Sequence[int] = (2, 3, 16, 3)
  dim_mul: float = 2.0
  head_mul: float = 2.0
  window_pos_embed_bkg_spatial_size: Tuple[int, int] = (14, 14)
  window_spec: Sequence[int] = (8, 4, 14, 7)
  global_att_blocks: Sequence[int] = (12, 16, 20)
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"
  # Run only blocks 0 .. num_blocks - 1 and return each one's output (the perceptual
  # features of `sam_perceptual.Sam2PerceptualLoss`); None: the whole trunk, stage outputs.
  num_blocks: Optional[int] = None

  @property
  def stage_ends(self):
    return [sum(self.stages[:i]) - 1 for i in range(1, len(self.stages) + 1)]

  def block_specs(self):
    """[(dim, dim_out, num_heads, q_stride, window_size)] per block, as `sam2` builds them."""
    ends = self.stage_ends
    q_pool_blocks = [e + 1 for e in ends[:-1]][:self.q_pool]
    dim, heads, cur_stage, specs = self.embed_dim, self.num_heads, 1, []
    for i in range(sum(self.stages)):
      dim_out = dim
      window = self.window_spec[cur_stage - 1]  # lags a block behind the stage change
      if i in self.global_att_blocks:
        window = 0
      if i - 1 in ends:
        dim_out = int(dim * self.dim_mul)
        heads = int(heads * self.head_mul)
        cur_stage += 1
      specs.append((dim, dim_out, heads, tuple(self.q_stride) if i in q_pool_blocks else None,
                    window))
      dim = dim_out
    return specs

  @property
  def channel_list(self):
    """Channels of the outputs, lowest resolution first (as `sam2`'s `channel_list`)."""
    specs = self.block_specs()
    return [specs[i][1] for i in self.stage_ends[::-1]]

  def _pos_embed(self, hw):  # -> (1, H, W, C)
    bh, bw = self.window_pos_embed_bkg_spatial_size
    ws = self.window_spec[0]
    pos = self.param("pos_embed", nn.initializers.zeros, (1, self.embed_dim, bh, bw))
    win = self.param("pos_embed_window", nn.initializers.zeros, (1, self.embed_dim, ws, ws))
    h, w = hw
    pos = resize_2d(pos, (h, w), bicubic_matrix)
    pos = pos + jnp.tile(win, (1, 1, h // ws, w // ws))
    return pos.transpose(0, 2, 3, 1)

  @nn.compact
  def __call__(self, x):  # (B, S, S, 3) -> [(B, S/4, S/4, C), ..., (B, S/32, S/32, 8C)]
    x = PatchEmbed(self.embed_dim, dtype=self.dtype, name="patch_embed")(x)
    x = x + self._pos_embed(x.shape[1:3]).astype(x.dtype)
    outputs = []
    ends = self.stage_ends
    specs = self.block_specs()
    if self.num_blocks is not None:
      specs = specs[:self.num_blocks]
    for i, (dim, dim_out, heads, q_stride, window) in enumerate(specs):
      x = MultiScaleBlock(dim, dim_out, heads, q_stride=q_stride, window_size=window,
                          dtype=self.dtype, attn_impl=self.attn_impl, name=f"blocks_{i}")(x)
      if i in ends or self.num_blocks is not None:
        outputs.append(x)
    return outputs
