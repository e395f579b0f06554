"""Fused-image decoder (Fig. 1's fusion feature map) and the ablation-A patch tokenizer.

``FusedImageDecoder``: fusion representation (B, h, w, d_c) -> fused image (B, h*s, w*s, 3)
in [0, 1] (sigmoid), built from the LSTG ``Decoder`` (ResBlocks + nearest upsampling).
It is trained with the SwinFusion-style fusion loss (``fusionsam_jax.losses``); its output
is the image the frozen SAM encoder sees.

``PatchEmbedTokenizer``: ablation A (no LSTG): a stride-s, kernel-s conv patch embedding
of one raw image (B, H, W, C) in [0, 1] -> (B, H/s, W/s, d_c), one instance per modality.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import flax.linen as nn

from fusionsam_jax.models.lstg import Decoder

Array = jax.Array


class FusedImageDecoder(nn.Module):
  """(B, h, w, d_c) -> (B, h*s, w*s, out_channels) in [0, 1]. Param tree: ``decoder``."""

  out_channels: int = 3
  ch: int = 64
  ch_mult: Optional[Sequence[int]] = None
  num_res_blocks: int = 2
  scale: int = 4
  max_groups: int = 32

  @nn.compact
  def __call__(self, fusion: Array) -> Array:
    y = Decoder(out_channels=self.out_channels, ch=self.ch, ch_mult=self.ch_mult,
                num_res_blocks=self.num_res_blocks, scale=self.scale,
                max_groups=self.max_groups, name="decoder")(fusion)
    return nn.sigmoid(y)


class PatchEmbedTokenizer(nn.Module):
  """Ablation A: (B, H, W, C) in [0, 1] -> (B, H/s, W/s, latent_dim). Param tree: ``proj``.

  Images are mapped to [-1, 1] first, like the LSTG encoder input.
  """

  latent_dim: int = 64
  scale: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.shape[1] % self.scale or x.shape[2] % self.scale:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by scale {self.scale}")
    s = self.scale
    return nn.Conv(self.latent_dim, (s, s), strides=(s, s), padding="VALID",
                   name="proj")(x * 2.0 - 1.0)
