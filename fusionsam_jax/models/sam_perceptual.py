"""Eq. 7 without user files: the frozen SAM image encoder's early blocks as Phi.

When no VGG16 weights are given (``config.perceptual_weights``), the perceptual loss uses the
first ``num_blocks`` ViT blocks of the run's converted SAM encoder (DESIGN.md §2.1), never
random features: `SamPerceptualLoss` exists only with converted SAM weights.

Phi on an image batch (B, H, W, C) in [0, 1]: 1-channel images repeated to RGB, x 255,
SAM's pixel mean / std normalisation, zero padding (after normalisation, as SAM pads) to a
multiple of the patch size, SAM's patch embedding plus the top-left (H/p, W/p) part of its
absolute position embedding (SAM's frame places the image in its top-left corner; the image
is NOT resized to SAM's 1024 frame, so a 480 x 640 crop gives 30 x 40 tokens), then blocks
0 .. num_blocks - 1 (windowed blocks only: those before SAM's first global-attention block).
Distance (per image), LPIPS-style without learned weights, as `vgg.perceptual_distance`:

    d(x, y) = sum_{l < num_blocks} mean_tokens sum_c (f_l(x)/||f_l(x)|| - f_l(y)/||f_l(y)||)^2
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.checkpoint import load_sam_checkpoint
from fusionsam_jax.models.sam.image_encoder import Block, PatchEmbed
from fusionsam_jax.models.sam.sam import PIXEL_MEAN, PIXEL_STD, SamConfig
from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint
from fusionsam_jax.models.sam2.hiera import Hiera
from fusionsam_jax.models.sam2.sam2 import PIXEL_MEAN as MEAN2, PIXEL_STD as STD2

Array = jax.Array


class SamEarlyBlocks(nn.Module):
  """Patch embedding + position embedding + the first `num_blocks` blocks of SAM's encoder.
  Param names are the encoder's (``patch_embed``, ``pos_embed``, ``blocks_i``), so the
  ``image_encoder`` subtree of a converted checkpoint applies as is. Returns the list of
  block outputs (B, h, w, embed_dim)."""

  config: SamConfig
  num_blocks: int = 2
  dtype: Any = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> list:
    cfg = self.config
    first_global = min(cfg.encoder_global_attn_indexes)
    if not 1 <= self.num_blocks <= first_global:
      raise ValueError(f"num_blocks must be in [1, {first_global}] (windowed blocks before "
                       f"SAM's first global block), got {self.num_blocks}")
    grid = cfg.img_size // cfg.patch_size
    x = PatchEmbed(cfg.patch_size, cfg.encoder_embed_dim, dtype=self.dtype,
                   name="patch_embed")(x)
    h, w = x.shape[1:3]
    if h > grid or w > grid:
      raise ValueError(f"image gives {h} x {w} tokens; SAM's frame holds {grid} x {grid}")
    pos = self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, cfg.encoder_embed_dim))
    x = x + pos[:, :h, :w].astype(x.dtype)
    feats = []
    for i in range(self.num_blocks):
      x = Block(dim=cfg.encoder_embed_dim, num_heads=cfg.encoder_num_heads, mlp_ratio=4.0,
                qkv_bias=True, use_rel_pos=True, window_size=cfg.window_size,
                input_size=(grid, grid), dtype=self.dtype, attn_impl=self.attn_impl,
                name=f"blocks_{i}")(x)
      feats.append(x)
    return feats


def _normalised_padded(x: Array, scale: float, mean, std, multiple: int) -> Array:
  """[0, 1] images (B, H, W, 1 or 3) -> (x * scale - mean) / std (B, H', W', 3), H', W'
  zero-padded (after normalisation) up to multiples of `multiple`."""
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = (x * scale - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)
  ph, pw = (-x.shape[1]) % multiple, (-x.shape[2]) % multiple
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


def sam_input(x: Array, patch_size: int) -> Array:
  """[0, 1] images (B, H, W, 1 or 3) -> SAM-normalised (B, H', W', 3), H', W' padded up to
  multiples of the patch size with zeros."""
  return _normalised_padded(x, 255.0, PIXEL_MEAN, PIXEL_STD, patch_size)


def _unit(f: Array, eps: float = 1e-10) -> Array:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class _EarlyBlocksLoss:
  """The distance above over a subclass's ``features`` (the frozen encoder's early blocks,
  params in ``self.params``); a pytree once a subclass is registered."""

  params: Mapping
  config: Any
  num_blocks: int
  dtype: Any
  attn_impl: str

  def features(self, x: Array) -> list:
    raise NotImplementedError

  def __call__(self, x: Array, y: Array) -> Array:
    """d(x, y) per image (B,); one forward pass over both batches."""
    if x.shape != y.shape:
      raise ValueError(f"{type(self).__name__}: shapes differ {x.shape} vs {y.shape}")
    b = x.shape[0]
    total = jnp.zeros((b,), jnp.float32)
    for f in self.features(jnp.concatenate([x, y], axis=0)):
      f = _unit(f.astype(jnp.float32))
      total = total + jnp.mean(jnp.sum(jnp.square(f[:b] - f[b:]), axis=-1), axis=(1, 2))
    return total

  def tree_flatten(self):
    return (self.params,), (self.config, self.num_blocks, self.dtype, self.attn_impl)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.params = children[0]
    obj.config, obj.num_blocks, obj.dtype, obj.attn_impl = aux
    return obj


@jax.tree_util.register_pytree_node_class
class SamPerceptualLoss(_EarlyBlocksLoss):
  """Eq. 7's distance with Phi = SAM's early blocks; a pytree (pass it into ``jit``).

      loss_fn = SamPerceptualLoss.from_checkpoint("ckpt/sam_vit_h")    # (B,) per call
      loss_fn = SamPerceptualLoss(sam_config, params["image_encoder"])

  The encoder's weights are frozen (stop_gradient); gradients flow to both images.
  """

  def __init__(self, config: SamConfig, encoder_params: Mapping, num_blocks: int = 2,
               dtype: Any = jnp.float32, attn_impl: str = "xla"):
    if encoder_params is None:
      raise ValueError("SamPerceptualLoss needs converted SAM weights; it never runs on "
                       "random features")
    self.config, self.num_blocks, self.dtype, self.attn_impl = (config, int(num_blocks),
                                                                 dtype, attn_impl)
    keep = ["patch_embed", "pos_embed"] + [f"blocks_{i}" for i in range(self.num_blocks)]
    missing = [k for k in keep if k not in encoder_params]
    if missing:
      raise ValueError(f"SAM encoder params lack {missing}")
    self.params = {k: encoder_params[k] for k in keep}

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str, **kwargs) -> "SamPerceptualLoss":
    cfg, params = load_sam_checkpoint(ckpt_dir)
    return cls(cfg, params["image_encoder"], **kwargs)

  def features(self, x: Array) -> list:
    net = SamEarlyBlocks(self.config, self.num_blocks, self.dtype, self.attn_impl)
    p = jax.lax.stop_gradient(self.params)
    return net.apply({"params": p}, sam_input(x, self.config.patch_size).astype(self.dtype))


def sam2_input(x: Array, multiple: int) -> Array:
  """[0, 1] images (B, H, W, 1 or 3) -> SAM 2-normalised (B, H', W', 3) (ImageNet mean /
  std on [0, 1] pixels), H', W' zero-padded up to multiples of `multiple`."""
  return _normalised_padded(x, 1.0, MEAN2, STD2, multiple)


@jax.tree_util.register_pytree_node_class
class Sam2PerceptualLoss(_EarlyBlocksLoss):
  """Eq. 7's distance with Phi = the first blocks of SAM 2's frozen Hiera trunk (those before
  its first q-pooling, at stride 4), for FusionSAM on a SAM 2 backbone; a pytree.

  The image is not resized to SAM 2's frame: it is normalised as SAM 2 does, zero-padded to
  a multiple of 4 x the first window size, patch-embedded, and gets Hiera's position
  embedding interpolated to its token grid (as `sam2`'s `Hiera._get_pos_embed` does for any
  grid). Same distance as `SamPerceptualLoss`.

      loss_fn = Sam2PerceptualLoss.from_checkpoint("ckpt/sam2.1_hiera_l")
  """

  def __init__(self, config, trunk_params: Mapping, num_blocks: int = 2,
               dtype: Any = jnp.float32, attn_impl: str = "xla"):
    if trunk_params is None:
      raise ValueError("Sam2PerceptualLoss needs converted SAM 2 weights; it never runs on "
                       "random features")
    first_stage = int(config.stages[0])
    if not 1 <= int(num_blocks) <= first_stage:
      raise ValueError(f"num_blocks must be in [1, {first_stage}] (the blocks of Hiera's first "
                       f"stage), got {num_blocks}")
    self.config, self.num_blocks, self.dtype, self.attn_impl = (config, int(num_blocks),
                                                                 dtype, attn_impl)
    keep = ["patch_embed", "pos_embed", "pos_embed_window"] + [
        f"blocks_{i}" for i in range(self.num_blocks)]
    missing = [k for k in keep if k not in trunk_params]
    if missing:
      raise ValueError(f"SAM 2 trunk params lack {missing}")
    self.params = {k: trunk_params[k] for k in keep}

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str, num_blocks: int = 2, **kwargs):
    """From a converted SAM 2 checkpoint; `num_blocks` is capped at the first stage's."""
    cfg, params = load_sam2_checkpoint(ckpt_dir)
    return cls(cfg, params["image_encoder"]["trunk"],
               num_blocks=min(int(num_blocks), int(cfg.stages[0])), **kwargs)

  def features(self, x: Array) -> list:
    net = Hiera(**dict(self.config.trunk_kwargs()), dtype=self.dtype, attn_impl=self.attn_impl,
                num_blocks=self.num_blocks)
    p = jax.lax.stop_gradient(self.params)
    x = sam2_input(x, 4 * int(self.config.window_spec[0])).astype(self.dtype)
    return net.apply({"params": p}, x)
