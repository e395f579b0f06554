"""Building blocks shared by SAM's modules (ports of `segment_anything.modeling.common`)."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

#: A/B switch for benchmarks only (issue 13 item 5): True makes the bf16 / fp16 path trace
#: `jax.nn.gelu`'s form too, 0.5 x erfc(-x / sqrt 2), which XLA expands into two polynomial
#: branches and an exp (the float32 path always uses that form, see `gelu`).
GELU_ERFC = False


def gelu_erf(x):
  """Exact GELU in its erf form, 0.5 x (1 + erf(x / sqrt 2)), computed in float32 for
  lower-precision inputs (as PyTorch's CUDA kernel computes bf16): the fast form.

  1 + erf(.) cancels for x below about -2, so there the result is accurate to about 1e-6
  absolute rather than relative: invisible in a bf16 output (8 significant bits), not float32
  accuracy (`gelu` uses the erfc form for float32).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  y = 0.5 * xf * (1.0 + jax.lax.erf(xf * np.sqrt(0.5).astype(xf.dtype)))
  return y.astype(x.dtype)


def gelu(x):
  """Exact (erf) GELU as `torch.nn.GELU()`, the form chosen by the input's dtype.

  float32 (and wider): `jax.nn.gelu(x, approximate=False)`, 0.5 x erfc(-x / sqrt 2), which
  keeps float32 relative accuracy in the negative tail, where 1 + erf(x / sqrt 2) cancels.
  bf16 / fp16: `gelu_erf` (fast; its tail error is far below a bf16 output's rounding),
  unless `GELU_ERFC` is set.
  """
  if GELU_ERFC or jnp.finfo(x.dtype).bits >= 32:
    return jax.nn.gelu(x, approximate=False)
  return gelu_erf(x)


class MLPBlock(nn.Module):
  """lin1 -> act -> lin2, as SAM's `MLPBlock`."""

  embedding_dim: int
  mlp_dim: int
  act: Callable = gelu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (..., embedding_dim)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x)
    x = self.act(x)
    return nn.Dense(self.embedding_dim, dtype=self.dtype, name="lin2")(x)


class MLP(nn.Module):
  """Dense layers with ReLU between (SAM's and SAM 2's decoder `MLP`); names `layers_0..`."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  sigmoid_output: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                   name=f"layers_{i}")(x)
      if not last:
        x = jax.nn.relu(x)
    return jax.nn.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
  """LayerNorm over the channel axis of a channels-last map (SAM's `LayerNorm2d`, eps 1e-6).

  SAM normalises NCHW tensors over C; channels-last this is a LayerNorm over the last axis,
  computed in float32 whatever the input dtype.
  """

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):  # (B, H, W, C)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    x = (x - mean) / jnp.sqrt(var + self.eps)
    return (x * scale + bias).astype(dtype)


class ConvTranspose2x2(nn.Module):
  """`nn.ConvTranspose2d(in, out, kernel_size=2, stride=2)`: each input pixel paints a 2x2 block.

  With kernel == stride the transposed conv has no overlap, so it is one einsum:
  out[2i+a, 2j+b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o].
  `kernel` is PyTorch's (in, out, kh, kw) weight permuted to (kh, kw, in, out).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C_in) -> (B, 2H, 2W, features)
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, c_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.einsum("nijc,abco->niajbo", x, kernel)
    n, h, _, w, _, o = y.shape
    return y.reshape(n, 2 * h, 2 * w, o) + bias
