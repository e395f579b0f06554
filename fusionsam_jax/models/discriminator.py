"""PatchGAN discriminator D of Eq. 8 (pix2pix / VQGAN "NLayerDiscriminator" layout).

    conv4x4/2 (base_ch) + LeakyReLU(0.2)
    (n_layers - 1) x [conv4x4/2 (base_ch * min(2^n, 8)) + norm + LeakyReLU(0.2)]
    conv4x4/1 (base_ch * min(2^n_layers, 8)) + norm + LeakyReLU(0.2)
    conv4x4/1 -> 1 channel patch logits

Input images (B, H, W, C) in [0, 1] (mapped to [-1, 1] inside, as the tokenizer does);
output logits (B, H', W', 1), e.g. (B, 30, 30, 1) for 256 x 256 with n_layers = 3.

Decision: VQGAN uses BatchNorm (or ActNorm); BatchNorm needs mutable running statistics
that do not fit the pure ``apply`` training step, so the default is GroupNorm
(``norm="group"``); ``"layer"`` and ``"none"`` are also accepted.
"""

from __future__ import annotations

import jax
import flax.linen as nn

from fusionsam_jax.models.lstg import num_groups_for

Array = jax.Array

_conv_init = nn.initializers.normal(stddev=0.02)


class PatchGANDiscriminator(nn.Module):
  base_ch: int = 64
  n_layers: int = 3
  norm: str = "group"       # "group" | "layer" | "none"
  max_groups: int = 32

  def _norm(self, x: Array, name: str) -> Array:
    if self.norm == "group":
      return nn.GroupNorm(num_groups=num_groups_for(x.shape[-1], self.max_groups),
                          name=name)(x)
    if self.norm == "layer":
      return nn.LayerNorm(name=name)(x)
    if self.norm == "none":
      return x
    raise ValueError(f"norm must be 'group', 'layer' or 'none', got {self.norm!r}")

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, H', W', 1)
    if self.n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
    h = x * 2.0 - 1.0
    h = nn.Conv(self.base_ch, (4, 4), strides=(2, 2), padding=1,
                kernel_init=_conv_init, name="conv_0")(h)
    h = nn.leaky_relu(h, 0.2)
    bias = self.norm == "none"      # a norm layer follows otherwise
    for n in range(1, self.n_layers):
      mult = min(2 ** n, 8)
      h = nn.Conv(self.base_ch * mult, (4, 4), strides=(2, 2), padding=1, use_bias=bias,
                  kernel_init=_conv_init, name=f"conv_{n}")(h)
      h = self._norm(h, f"norm_{n}")
      h = nn.leaky_relu(h, 0.2)
    mult = min(2 ** self.n_layers, 8)
    h = nn.Conv(self.base_ch * mult, (4, 4), strides=(1, 1), padding=1, use_bias=bias,
                kernel_init=_conv_init, name=f"conv_{self.n_layers}")(h)
    h = self._norm(h, f"norm_{self.n_layers}")
    h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (4, 4), strides=(1, 1), padding=1, kernel_init=_conv_init,
                   name="conv_out")(h)
