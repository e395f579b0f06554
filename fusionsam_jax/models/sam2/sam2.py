"""SAM 2 (image path) in Flax: `Sam2Config`, the SAM 2.1 presets and the `Sam2` module.

The parameter tree mirrors the image-path part of `sam2`'s `SAM2Base` state dict:
`image_encoder/{trunk,neck}`, `sam_prompt_encoder`, `sam_mask_decoder` and `no_mem_embed`
(added to the stride-16 features for single images, as `SAM2ImagePredictor` does). The video
memory modules are not part of the image path.

  model = Sam2(SAM2_PRESETS["hiera_l"])
  feats = model.apply({"params": p}, images, method=Sam2.encode)   # (B, 1024, 1024, 3)
  low_res, iou, obj = model.apply({"params": p}, feats, point_coords=..., point_labels=...,
                                  multimask_output=True, method=Sam2.decode)

`encode` returns `Sam2Features(image_embed (B, 64, 64, 256), high_res_feats ((B, 256, 256, 32),
(B, 128, 128, 64)))` for 1024 inputs; `decode` returns low-res logits (B, M, 256, 256), IoU
(B, M) and object-score logits (B, 1).
"""

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.sam import JaxDevice
from fusionsam_jax.models.sam2.image_encoder import ImageEncoder
from fusionsam_jax.models.sam2.sam_heads import MaskDecoder, PromptEncoder

PIXEL_MEAN = (0.485, 0.456, 0.406)  # on [0, 1] pixels
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Sam2Config:
  """Every size that defines the image path of a SAM 2 model (defaults: hiera_b+)."""

  image_size: int = 1024
  embed_dim: int = 112
  num_heads: int = 2
  stages: Tuple[int, ...] = (2, 3, 16, 3)
  global_att_blocks: Tuple[int, ...] = (12, 16, 20)
  window_spec: Tuple[int, ...] = (8, 4, 14, 7)
  window_pos_embed_bkg_spatial_size: Tuple[int, int] = (14, 14)
  d_model: int = 256
  fpn_top_down_levels: Tuple[int, ...] = (2, 3)
  scalp: int = 1
  mask_in_chans: int = 16
  iou_prediction_use_sigmoid: bool = True
  pred_obj_scores: bool = True
  pred_obj_scores_mlp: bool = True
  # build_sam2(apply_postprocessing=True), the default, turns this on.
  dynamic_multimask_via_stability: bool = True

  @property
  def backbone_stride(self) -> int:
    return 16

  @property
  def image_embedding_size(self) -> int:
    return self.image_size // self.backbone_stride

  def trunk_kwargs(self):
    return (("embed_dim", self.embed_dim), ("num_heads", self.num_heads),
            ("stages", tuple(self.stages)), ("global_att_blocks", tuple(self.global_att_blocks)),
            ("window_spec", tuple(self.window_spec)),
            ("window_pos_embed_bkg_spatial_size", tuple(self.window_pos_embed_bkg_spatial_size)))

  def to_dict(self):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SAM2_PRESETS = {
    "hiera_t": Sam2Config(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2),
                          global_att_blocks=(5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_s": Sam2Config(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2),
                          global_att_blocks=(7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_b+": Sam2Config(),
    "hiera_l": Sam2Config(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4),
                          global_att_blocks=(23, 33, 43), window_spec=(8, 4, 16, 8),
                          window_pos_embed_bkg_spatial_size=(7, 7)),
    # Tiny model for tests: every code path of the big ones (q-pool into windows, window
    # padding, a global block, bicubic background position embedding), small sizes.
    "tiny": Sam2Config(image_size=256, embed_dim=16, num_heads=1, stages=(1, 2, 3, 1),
                       global_att_blocks=(4,), window_spec=(8, 4, 6, 3),
                       window_pos_embed_bkg_spatial_size=(5, 5)),
}


def preset_name(cfg: Sam2Config) -> Optional[str]:
  for name, preset in SAM2_PRESETS.items():
    if preset == cfg:
      return name
  return None


class Sam2Features(NamedTuple):
  image_embed: Any      # (B, h, w, C), no_mem_embed added
  high_res_feats: Any   # ((B, 4h, 4w, C/8), (B, 2h, 2w, C/4)), projected by conv_s0 / conv_s1


class Sam2(nn.Module):
  """SAM 2 image model. `dtype` is the compute dtype of the image encoder."""

  config: Sam2Config
  dtype: Any = jnp.float32
  attn_impl: str = "xla"

  def setup(self):
    cfg = self.config
    e = cfg.image_embedding_size
    self.image_encoder = ImageEncoder(cfg.trunk_kwargs(), cfg.d_model,
                                      tuple(cfg.fpn_top_down_levels), cfg.scalp,
                                      dtype=self.dtype, attn_impl=self.attn_impl)
    self.sam_prompt_encoder = PromptEncoder(cfg.d_model, (e, e),
                                            (cfg.image_size, cfg.image_size), cfg.mask_in_chans)
    self.sam_mask_decoder = MaskDecoder(
        cfg.d_model, iou_prediction_use_sigmoid=cfg.iou_prediction_use_sigmoid,
        pred_obj_scores=cfg.pred_obj_scores, pred_obj_scores_mlp=cfg.pred_obj_scores_mlp,
        dynamic_multimask_via_stability=cfg.dynamic_multimask_via_stability)
    self.no_mem_embed = self.param("no_mem_embed", nn.initializers.normal(0.02),
                                   (1, 1, cfg.d_model))

  def backbone(self, images):
    """(B, S, S, 3) normalised pixels -> `backbone_fpn`: [(B, S/4, S/4, d), (B, S/8, S/8, d),
    (B, S/16, S/16, d)], before conv_s0 / conv_s1, as `sam2`'s `image_encoder` returns it."""
    return self.image_encoder(images)

  def encode(self, images) -> Sam2Features:
    """(B, S, S, 3) normalised pixels -> what `SAM2ImagePredictor.set_image` keeps."""
    fpn = self.image_encoder(images)
    s0, s1 = self.sam_mask_decoder.project_high_res(fpn[0], fpn[1])
    embed = fpn[-1] + self.no_mem_embed[0, 0].astype(fpn[-1].dtype)
    return Sam2Features(embed.astype(jnp.float32), (s0.astype(jnp.float32),
                                                    s1.astype(jnp.float32)))

  def prompt_embeddings(self, point_coords=None, point_labels=None, boxes=None,
                        mask_inputs=None):
    """`sam_prompt_encoder(points, boxes, masks)`: -> sparse (B, N, C), dense (B, h, w, C).

    point_coords (B, N, 2) xy in the image_size frame, point_labels (B, N) (0 / 1, 2 / 3 box
    corners, -1 padding), boxes (B, 4), mask_inputs (B, 4h, 4w, 1) low-res logits."""
    points = None if point_coords is None else (point_coords, point_labels)
    return self.sam_prompt_encoder(points, boxes, mask_inputs)

  def dense_pe(self):
    return self.sam_prompt_encoder.get_dense_pe()

  def decode(self, features: Sam2Features, point_coords=None, point_labels=None, boxes=None,
             mask_inputs=None, multimask_output: bool = True, token_mask=None):
    """Prompts as in `prompt_embeddings` for the first image of `features` (as
    `SAM2ImagePredictor._predict`, which repeats it when the prompts are batched).

    `token_mask` (B, N'): False for bucket-padding tokens among the sparse embeddings
    (N' = number of sparse tokens). Returns low-res logits (B, M, 4h, 4w), IoU (B, M),
    object-score logits (B, 1)."""
    sparse, dense = self.prompt_embeddings(point_coords, point_labels, boxes, mask_inputs)
    batched = sparse.shape[0] > 1
    embed = features.image_embed[:1]
    high = tuple(f[:1] for f in features.high_res_feats)
    return self.sam_mask_decoder(embed, self.dense_pe(), sparse, dense, multimask_output,
                                 repeat_image=batched, high_res_features=high,
                                 token_mask=token_mask)

  def __call__(self, images, point_coords=None, point_labels=None, boxes=None,
               mask_inputs=None, multimask_output: bool = True):
    return self.decode(self.encode(images), point_coords, point_labels, boxes, mask_inputs,
                       multimask_output)

  def init_params(self, rng):
    s = self.config.image_size
    e = self.config.image_embedding_size
    return self.init(rng, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 1, 2)),
                     jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 4)),
                     jnp.zeros((1, 4 * e, 4 * e, 1)))["params"]


class LoadedSam2:
  """What `build_sam2(...)` returns: a config and its params (the `SAM2Base` of the official
  API, image path only). `SAM2ImagePredictor` takes it.

  The torch-module calls the official notebooks make are accepted: `to(device)` and `eval()`
  return the model itself (JAX places arrays itself), `device` is a `JaxDevice` (the string
  "cpu" for host-side torch tensors, with the JAX device in `jax_device`).
  """

  def __init__(self, config: Sam2Config, params, encoder_dtype=jnp.float32,
               attn_impl: str = "xla"):
    self.config = config
    self.params = params
    self.encoder_dtype = encoder_dtype
    self.attn_impl = attn_impl

  @property
  def image_size(self) -> int:
    return self.config.image_size

  @property
  def module(self) -> Sam2:
    return Sam2(self.config, dtype=self.encoder_dtype, attn_impl=self.attn_impl)

  @property
  def device(self) -> JaxDevice:
    return JaxDevice()

  def to(self, *args, **kwargs) -> "LoadedSam2":
    return self

  def eval(self) -> "LoadedSam2":
    return self

  def __repr__(self):
    return f"LoadedSam2({preset_name(self.config) or self.config})"


def decode_padded(module: Sam2, features: Sam2Features, image_index, coords, labels,
                  token_mask, masks, mask_valid, multimask_output: bool = True):
  """`Sam2.decode` on prompts in a fixed layout (bound `module`: call through `apply`).

  coords (B, N, 2), labels (B, N) as `decode` takes them (box corners first, labels 2 / 3),
  token_mask (B, N + 1) (False: bucket padding; the last slot is the pad point the prompt
  encoder appends), masks (B, 4h, 4w, 1) with mask_valid (B,) (False: "no mask", the
  `no_mask_embed`); image_index picks the image of `features`. One program serves points,
  boxes and mask inputs alike. Returns low-res logits (B, M, 4h, 4w), IoU (B, M).
  """
  enc = module.sam_prompt_encoder
  sparse, dense_m = enc((coords, labels), None, masks)
  b, (h, w) = coords.shape[0], enc.image_embedding_size
  no_mask = jnp.broadcast_to(enc.no_mask_embed.embedding[0], (b, h, w, enc.embed_dim))
  dense = jnp.where(jnp.asarray(mask_valid, bool)[:, None, None, None], dense_m, no_mask)
  pick = lambda a: jax.lax.dynamic_index_in_dim(a, image_index, 0, keepdims=True)
  embed = pick(features.image_embed)
  high = tuple(pick(f) for f in features.high_res_feats)
  low_res, iou, _ = module.sam_mask_decoder(embed, module.dense_pe(), sparse, dense,
                                            multimask_output, repeat_image=b > 1,
                                            high_res_features=high, token_mask=token_mask)
  return low_res, iou
