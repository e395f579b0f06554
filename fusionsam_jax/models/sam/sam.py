"""Segment Anything assembled from its three parts, with the ViT-B/L/H presets.

`SamConfig` holds every size SAM's builders hard-code, so a tiny model for tests is just a
different config. The parameter tree has SAM's top-level names: `image_encoder`,
`prompt_encoder`, `mask_decoder`.
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.image_encoder import ImageEncoderViT
from fusionsam_jax.models.sam.mask_decoder import MaskDecoder
from fusionsam_jax.models.sam.prompt_encoder import PromptEncoder

# SAM's normalisation constants (not stored in the checkpoint).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Every size that defines a SAM model."""

  encoder_embed_dim: int = 768
  encoder_depth: int = 12
  encoder_num_heads: int = 12
  encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
  window_size: int = 14
  patch_size: int = 16
  img_size: int = 1024
  prompt_embed_dim: int = 256
  mask_in_chans: int = 16
  decoder_transformer_depth: int = 2
  decoder_num_heads: int = 8
  decoder_mlp_dim: int = 2048
  iou_head_hidden_dim: int = 256
  num_multimask_outputs: int = 3

  @property
  def image_embedding_size(self) -> int:
    return self.img_size // self.patch_size

  def to_dict(self):
    d = dataclasses.asdict(self)
    d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
    return d

  @classmethod
  def from_dict(cls, d):
    d = dict(d)
    d["encoder_global_attn_indexes"] = tuple(d["encoder_global_attn_indexes"])
    return cls(**d)


SAM_PRESETS = {
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    # Tiny model for tests and the CPU demo: same structure, small sizes.
    "tiny": SamConfig(encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2,
                      encoder_global_attn_indexes=(1, 3), window_size=4, img_size=256,
                      prompt_embed_dim=64, mask_in_chans=8, decoder_num_heads=4,
                      decoder_mlp_dim=128, iou_head_hidden_dim=64),
}


def preset_name(cfg: SamConfig) -> Optional[str]:
  """The preset a config equals, or None."""
  for name, preset in SAM_PRESETS.items():
    if preset == cfg:
      return name
  return None


def make_image_encoder(cfg: SamConfig, dtype=jnp.float32, attn_impl: str = "xla",
                       remat: bool = False, name: Optional[str] = None) -> ImageEncoderViT:
  return ImageEncoderViT(
      img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_embed_dim,
      depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads, out_chans=cfg.prompt_embed_dim,
      use_rel_pos=True, window_size=cfg.window_size,
      global_attn_indexes=tuple(cfg.encoder_global_attn_indexes), dtype=dtype,
      attn_impl=attn_impl, remat=remat, name=name)


def make_prompt_encoder(cfg: SamConfig, mask_in_chans: Optional[int] = None,
                        name: Optional[str] = None) -> PromptEncoder:
  e = cfg.image_embedding_size
  return PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
                       input_image_size=(cfg.img_size, cfg.img_size),
                       mask_in_chans=mask_in_chans or cfg.mask_in_chans, name=name)


def make_mask_decoder(cfg: SamConfig, name: Optional[str] = None) -> MaskDecoder:
  return MaskDecoder(transformer_dim=cfg.prompt_embed_dim,
                     num_multimask_outputs=cfg.num_multimask_outputs,
                     iou_head_hidden_dim=cfg.iou_head_hidden_dim,
                     transformer_depth=cfg.decoder_transformer_depth,
                     transformer_num_heads=cfg.decoder_num_heads,
                     transformer_mlp_dim=cfg.decoder_mlp_dim, name=name)


class Sam(nn.Module):
  """SAM: image encoder, prompt encoder and mask decoder.

  `encode(images)` runs the (expensive) image encoder once; `decode(...)` runs prompt
  encoding and mask decoding on cached embeddings.
  """

  config: SamConfig
  encoder_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  def setup(self):
    self.image_encoder = make_image_encoder(self.config, self.encoder_dtype, self.attn_impl)
    self.prompt_encoder = make_prompt_encoder(self.config)
    self.mask_decoder = make_mask_decoder(self.config)

  def encode(self, images):
    """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, C) float32 embeddings."""
    return self.image_encoder(images.astype(self.encoder_dtype)).astype(jnp.float32)

  def decode(self, image_embeddings, point_coords=None, point_labels=None, boxes=None,
             mask_inputs=None, multimask_output: bool = True):
    """Prompts in the 1024 input frame -> (low-res mask logits (B, M, 256, 256), iou (B, M))."""
    points = None if point_coords is None else (point_coords, point_labels)
    sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                             dense, multimask_output)

  def decode_padded(self, image_embeddings, coords, labels, point_valid, boxes, box_valid,
                    masks, mask_valid, multimask_output: bool = True):
    """`decode` on prompts in the fixed padded layout of `PromptEncoder.embed_padded`."""
    sparse, sparse_mask, dense = self.prompt_encoder.embed_padded(
        coords, labels, point_valid, boxes, box_valid, masks, mask_valid)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                             dense, multimask_output, sparse_mask)

  def prompt_embeddings(self, point_coords=None, point_labels=None, boxes=None,
                        mask_inputs=None):
    points = None if point_coords is None else (point_coords, point_labels)
    return self.prompt_encoder(points, boxes, mask_inputs)

  def __call__(self, images, point_coords=None, point_labels=None, boxes=None,
               mask_inputs=None, multimask_output: bool = True):
    return self.decode(self.encode(images), point_coords, point_labels, boxes, mask_inputs,
                       multimask_output)

  def init_params(self, rng):
    """Random params for the whole model (abstract shapes: use `jax.eval_shape` on this)."""
    s = self.config.img_size
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    coords = jnp.zeros((1, 1, 2), jnp.float32)
    labels = jnp.ones((1, 1), jnp.int32)
    boxes = jnp.zeros((1, 4), jnp.float32)
    masks = jnp.zeros((1, 4 * self.config.image_embedding_size,
                       4 * self.config.image_embedding_size, 1), jnp.float32)
    return self.init(rng, images, coords, labels, boxes, masks)["params"]


class JaxDevice(str):
  """What `.device` returns on the drop-in models and predictors: the string "cpu", so the
  official notebooks' `torch.tensor(..., device=predictor.device)` builds host tensors (the
  predictors take their prompts from the host), with the JAX device that computes in
  `jax_device` and in the repr."""

  jax_device: Any = None

  def __new__(cls):
    self = super().__new__(cls, "cpu")
    self.jax_device = jax.devices()[0]
    return self

  @property
  def type(self) -> str:
    return "cpu"

  def __repr__(self):
    return f"JaxDevice({self.jax_device})"


class _Encoder:
  """`sam.image_encoder` as the notebooks read it (`img_size`)."""

  def __init__(self, img_size: int):
    self.img_size = img_size


class LoadedSam:
  """What `sam_model_registry[...]` returns: a config and its params (the `Sam` module of
  the official API). `SamPredictor` and `SamAutomaticMaskGenerator` take it.

  The torch-module calls of the official notebooks work: `to(device)` / `eval()` return the
  model itself (JAX places the arrays), `device` is a `JaxDevice`, `image_encoder.img_size`
  is the input size. (`build.SamModel`, what the builders return, adds the batched
  `sam(batched_input, multimask_output)`.)
  """

  mask_threshold = 0.0
  image_format = "RGB"

  def __init__(self, config: SamConfig, params, encoder_dtype=jnp.float32,
               attn_impl: str = "xla"):
    self.config = config
    self.params = params
    self.encoder_dtype = encoder_dtype
    self.attn_impl = attn_impl

  @property
  def module(self) -> Sam:
    return Sam(self.config, encoder_dtype=self.encoder_dtype, attn_impl=self.attn_impl)

  @property
  def image_encoder(self) -> _Encoder:
    return _Encoder(self.config.img_size)

  @property
  def device(self) -> JaxDevice:
    return JaxDevice()

  def to(self, *args, **kwargs) -> "LoadedSam":
    return self

  def eval(self) -> "LoadedSam":
    return self

  def __repr__(self):
    return f"LoadedSam({self.config})"
