"""SAM 2's image encoder: Hiera trunk + FPN neck (port of
`sam2.modeling.backbones.image_encoder`).

The neck projects every trunk level to `d_model` channels with a 1x1 conv (`convs_0` takes
the lowest resolution, as in `sam2`) and adds the 2x nearest-upsampled coarser level to the
levels listed in `fpn_top_down_levels`. `scalp` drops the coarsest outputs. The sine position
encodings of the neck feed only the video memory and are not computed here.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fusionsam_jax.models.sam2.hiera import Hiera

Dtype = Any


class _Conv1x1(nn.Module):
  """`convs.i` of `sam2`'s neck: an `nn.Sequential` holding one conv named `conv`."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, (1, 1), dtype=self.dtype, name="conv")(x)


class FpnNeck(nn.Module):
  """[(B, H_i, W_i, C_i)] highest resolution first -> same grids at `d_model` channels."""

  d_model: int
  backbone_channel_list: Sequence[int]
  fpn_top_down_levels: Sequence[int] = (2, 3)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs):
    n = len(self.backbone_channel_list) - 1
    assert len(xs) == n + 1
    convs = [_Conv1x1(self.d_model, dtype=self.dtype, name=f"convs_{j}") for j in range(n + 1)]
    out = [None] * (n + 1)
    prev = None
    for i in range(n, -1, -1):
      lateral = convs[n - i](xs[i])
      if i in self.fpn_top_down_levels and prev is not None:
        top_down = jnp.repeat(jnp.repeat(prev.astype(jnp.float32), 2, axis=1), 2, axis=2)
        prev = lateral + top_down
      else:
        prev = lateral
      out[i] = prev
    return out


class ImageEncoder(nn.Module):
  """Trunk -> neck -> drop the `scalp` coarsest levels: the `backbone_fpn` list of `sam2`."""

  trunk_kwargs: Any
  d_model: int = 256
  fpn_top_down_levels: Sequence[int] = (2, 3)
  scalp: int = 1
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"

  def setup(self):
    self.trunk = Hiera(**dict(self.trunk_kwargs), dtype=self.dtype, attn_impl=self.attn_impl)
    self.neck = FpnNeck(self.d_model, tuple(self.trunk.channel_list),
                        tuple(self.fpn_top_down_levels), dtype=self.dtype)

  def __call__(self, x):  # (B, S, S, 3) -> [(B, S/4, S/4, d), (B, S/8, S/8, d), (B, S/16, ..)]
    features = self.neck(self.trunk(x))
    if self.scalp > 0:
      features = features[:-self.scalp]
    return features


class Sam2FeatureEncoder(ImageEncoder):
  """SAM 2's image features as `SAM2ImagePredictor.set_image` keeps them, as one frozen
  module (FusionSAM's SAM 2 backbone, `model.backbone="sam2_*"`): trunk + neck, then
  `conv_s0` / `conv_s1` (in `sam2`: the mask decoder's projections of the two high-resolution
  levels) and `no_mem_embed` added to the stride-16 level.

  (B, S, S, 3) normalised pixels -> (image_embed (B, S/16, S/16, d),
  high_res_0 (B, S/4, S/4, d/8), high_res_1 (B, S/8, S/8, d/4)).
  Params: `trunk`, `neck` (sam2's `image_encoder.*`), `conv_s0`, `conv_s1`
  (`sam_mask_decoder.conv_s*`), `no_mem_embed` (1, 1, d).
  """

  def setup(self):
    super().setup()
    d = self.d_model
    self.conv_s0 = nn.Conv(d // 8, (1, 1), dtype=self.dtype)
    self.conv_s1 = nn.Conv(d // 4, (1, 1), dtype=self.dtype)
    self.no_mem_embed = self.param("no_mem_embed", nn.initializers.normal(0.02), (1, 1, d))

  def __call__(self, x):
    fpn = super().__call__(x)
    embed = fpn[-1] + self.no_mem_embed[0, 0].astype(fpn[-1].dtype)
    return embed, self.conv_s0(fpn[0]), self.conv_s1(fpn[1])
