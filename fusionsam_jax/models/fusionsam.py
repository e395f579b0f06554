"""FusionSAM assembled: LSTG tokenizers -> FMP -> fused image -> frozen SAM encoder, and
fusion prompts -> semantic mask decoder (paper Fig. 2; docs/design.md).

Parameter tree (top level; the roles are declared once in `models.layout.ParamLayout`):
  tokenizer_<m>   LatentTokenizer per modality m        (ablation A: patch_embed_<m>)
  fmp             the fusion module of ``model.fusion`` (`layout.FUSIONS`): FMP under
                  ``fmp``; ablation B / 1 modality: ConcatFusion under ``concat_fusion``
  fused_decoder   FusedImageDecoder -> fused RGB image
  image_encoder   SAM ViT (frozen; SAM's names), or with a SAM 2 backbone (`sam2` set,
                  ``model.backbone="sam2_*"``) `Sam2FeatureEncoder`: Hiera trunk + FPN neck +
                  SAM 2's high-res projections and no_mem_embed (frozen; SAM 2's names)
  prompt_encoder  SAM prompt encoder; mask_downscaling takes d_c channels
  point_prompt    FusionPointPromptEncoder
  mask_decoder    SemanticMaskDecoder (SAM's transformer + per-class output tokens)

Shapes: images (B, H, W, C_m) in [0, 1]; latents (B, H/s, W/s, d_c); SAM embeddings
(B, e, e, C) with e = img_size / 16; logits (B, H, W, K). With a SAM 2 backbone the
"embeddings" are the tuple (image_embed (B, e, e, C), high_res_0 (B, 4e, 4e, C/8),
high_res_1 (B, 2e, 2e, C/4)), the fused image is resized to S x S as SAM 2 does (no
padding), and the semantic decoder adds the high-res levels in its upscaling (SAM 2's mask
decoder). `sam` then describes only the prompt encoder and decoder sizes
(`sam_heads_config`).
"""

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax.jit_utils import run_once
from fusionsam_jax.losses import rgb_to_y
from fusionsam_jax.models import fmp as _fmp  # noqa: F401 (registers "fmp" and "concat")
from fusionsam_jax.models.discriminator import PatchGANDiscriminator
from fusionsam_jax.models.fused_decoder import FusedImageDecoder, PatchEmbedTokenizer
from fusionsam_jax.models.layout import fusion_module, ParamLayout, patch_embed_key, tokenizer_key
from fusionsam_jax.models.lstg import LatentTokenizer
from fusionsam_jax.models.precision import check_train_dtype
from fusionsam_jax.models.prompts import dense_prompt_input, FusionPointPromptEncoder
from fusionsam_jax.models.sam.checkpoint import CheckpointError, load_sam_checkpoint
from fusionsam_jax.models.sam.image_encoder import resolve_attn_impl
from fusionsam_jax.models.sam.sam import (make_image_encoder, make_prompt_encoder, PIXEL_MEAN,
                                          PIXEL_STD, SAM_PRESETS, SamConfig)
from fusionsam_jax.models.sam.transforms import get_preprocess_shape
from fusionsam_jax.models.sam2 import checkpoint as sam2_checkpoint
from fusionsam_jax.models.sam2.image_encoder import Sam2FeatureEncoder
from fusionsam_jax.models.sam2.interp import bilinear_matrix
from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS, Sam2Config
from fusionsam_jax.models.semantic_decoder import SemanticMaskDecoder

CHANNELS = {"rgb": 3, "thermal": 1, "depth": 1}


def _frozen(d) -> Tuple[Tuple[str, Any], ...]:
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d).items()))


class FusionSAM(nn.Module):
  """The whole model. Build it with `build_model(config.model)`."""

  modalities: Tuple[str, ...]
  num_classes: int
  sam: SamConfig
  scale: int = 4
  tokenizer_kind: str = "lstg"  # "lstg" | "patch" (ablation A)
  tokenizer_kwargs: Tuple[Tuple[str, Any], ...] = ()
  fusion: str = "fmp"  # a `layout.FUSIONS` name: "fmp" | "concat" (ablation B) | ...
  fusion_kwargs: Tuple[Tuple[str, Any], ...] = ()  # its options (`FusionModule.options`)
  fused_decoder_kwargs: Tuple[Tuple[str, Any], ...] = ()
  encoder_dtype: str = "float32"
  # Compute dtype of the frozen fusion path (tokenizers, fusion, fused decoder) in the
  # segmentation stage, the embedding cache and evaluation: `stages.frozen_fusion`.
  fusion_dtype: str = "float32"
  # Compute dtype of the trained tokenizers, discriminators, fusion module and fused decoder
  # in the training stages (params and optimizer state stay float32): `models.precision`.
  train_dtype: str = "float32"
  attn_impl: str = "xla"
  num_points: int = 8
  fused_color: str = "decoder"  # "decoder" | "visible_chroma" (see `fuse`)
  train_sam_encoder: bool = False
  sam2: Optional[Sam2Config] = None  # a SAM 2 backbone (model.backbone="sam2_*")

  @property
  def layout(self) -> ParamLayout:
    """Role -> top-level param keys of this model (`models.layout`)."""
    return ParamLayout.build(self.modalities, self.tokenizer_kind, self.fusion)

  def setup(self):
    tk = dict(self.tokenizer_kwargs)
    self.latent_dim = tk.get("latent_dim", 16)
    lay = self.layout
    for m in self.modalities:
      if m not in CHANNELS:
        raise ValueError(f"unknown modality {m!r}; expected one of {sorted(CHANNELS)}")
    for m, key in zip(self.modalities, lay.tokenizers):
      setattr(self, key, LatentTokenizer(in_channels=CHANNELS[m], scale=self.scale, **tk))
    for key in lay.patch_embeds:
      setattr(self, key, PatchEmbedTokenizer(latent_dim=self.latent_dim, scale=self.scale))
    setattr(self, lay.fusion, lay.fusion_spec.make(self))
    if self.fused_color not in ("decoder", "visible_chroma"):
      raise ValueError(f"fused_color must be 'decoder' or 'visible_chroma', got "
                       f"{self.fused_color!r}")
    self.fused_decoder = FusedImageDecoder(out_channels=3, scale=self.scale,
                                           **dict(self.fused_decoder_kwargs))
    self.image_encoder = image_encoder_of(self)
    self.prompt_encoder = make_prompt_encoder(self.sam)
    self.point_prompt = FusionPointPromptEncoder(self.num_points, self.sam.prompt_embed_dim)
    self.mask_decoder = SemanticMaskDecoder(
        self.num_classes, self.sam.prompt_embed_dim, self.sam.decoder_transformer_depth,
        self.sam.decoder_num_heads, self.sam.decoder_mlp_dim, high_res=self.sam2 is not None)

  # --- stage 1: tokenizers -------------------------------------------------------------
  def tokenizer(self, x, modality: str):
    """LSTG forward for one modality: dict(z, z_q, indices, recon, loss terms)."""
    return getattr(self, tokenizer_key(modality))(x)

  def tokenize(self, images: Mapping[str, Any]) -> Dict[str, Any]:
    """{m: (B, H, W, C_m)} -> {m: z_q (B, h, w, d_c)} (patch embeddings for ablation A)."""
    out = {}
    for m in self.modalities:
      if self.tokenizer_kind == "lstg":
        out[m] = getattr(self, tokenizer_key(m)).encode(images[m])["z_q"]
      else:
        out[m] = getattr(self, patch_embed_key(m))(images[m])
    return out

  def tokenize_vq(self, images: Mapping[str, Any]):
    """As `tokenize`, plus each tokenizer's Eq. 6 term (codebook + beta * commitment):
    ({m: z_q (B, h, w, d_c)}, {m: vq_loss ()}); zero terms for patch embeddings."""
    out, vq = {}, {}
    for m in self.modalities:
      if self.tokenizer_kind == "lstg":
        q = getattr(self, tokenizer_key(m)).encode(images[m])
        out[m], vq[m] = q["z_q"], q["vq_loss"]
      else:
        out[m], vq[m] = getattr(self, patch_embed_key(m))(images[m]), jnp.zeros(())
    return out, vq

  # --- stage 2: fusion -----------------------------------------------------------------
  def fuse(self, latents: Mapping[str, Any], images: Optional[Mapping[str, Any]] = None):
    """{m: (B, h, w, d_c)} -> dict(fusion (B, h, w, d_c), fused (B, H, W, 3) ~[0, 1]).

    The fusion loss constrains only the fused image's luma. With ``fused_color=
    "visible_chroma"`` (and an RGB modality) the fused image keeps the decoder's luma and
    takes its chroma from the RGB input, as the official code combines its fused channel
    with the visible image's colour: ``fused = rgb + (Y(decoded) - Y(rgb))``, which leaves
    BT.601 Cb/Cr of `rgb` unchanged and sets the luma to the decoder's (unclipped, so the
    fusion loss sees exactly the decoder's luma). Needs `images`. With "decoder" (or no
    RGB input) the decoder's own RGB output is used.
    """
    zs = [latents[m] for m in self.modalities]
    fusion = getattr(self, self.layout.fusion)(zs)["fusion"]              # (B, h, w, d_c)
    fused = self.fused_decoder(fusion)                                     # (B, H, W, 3)
    if self.fused_color == "visible_chroma" and "rgb" in self.modalities:
      if images is None:
        raise ValueError("fused_color='visible_chroma' needs the input images in fuse()")
      rgb = images["rgb"]
      fused = fused.astype(jnp.promote_types(fused.dtype, rgb.dtype))  # bf16 decoder: f32
      rgb = rgb.astype(fused.dtype)
      fused = rgb + (rgb_to_y(fused) - rgb_to_y(rgb))
    return dict(fusion=fusion, fused=fused)

  # --- SAM image path ------------------------------------------------------------------
  def content_hw(self, h: int, w: int) -> Tuple[int, int]:
    """Where an (h, w) image lies in the S x S input frame (top-left (nh, nw) pixels): SAM
    keeps the aspect ratio and pads; SAM 2 resizes to the whole frame."""
    s = self.sam.img_size
    return (s, s) if self.sam2 is not None else get_preprocess_shape(h, w, s)

  def sam_input(self, fused):
    """Fused image (B, H, W, 3) in [0, 1] -> SAM's normalised, padded input (B, S, S, 3).

    As SAM's preprocessing: longest side resized to S (bilinear), normalised with SAM's
    pixel mean/std on the 0-255 scale, zero-padded bottom/right. SAM 2 (same mean / std):
    resized to S x S, no padding.
    """
    b, h, w, _ = fused.shape
    s = self.sam.img_size
    nh, nw = self.content_hw(h, w)
    x = jax.image.resize(fused * 255.0, (b, nh, nw, 3), "linear", antialias=True)
    x = (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    return jnp.pad(x, ((0, 0), (0, s - nh), (0, s - nw), (0, 0)))

  def image_embeddings(self, fused):
    """(B, H, W, 3) -> SAM embeddings (B, e, e, C) float32 (SAM 2: the tuple of three
    levels, see the module docstring). No gradient by default."""
    x = self.sam_input(fused)
    if not self.train_sam_encoder:
      x = jax.lax.stop_gradient(x)
    emb = self.image_encoder(x.astype(jnp.dtype(self.encoder_dtype)))
    emb = jax.tree.map(lambda a: a.astype(jnp.float32), emb)
    return emb if self.train_sam_encoder else jax.lax.stop_gradient(emb)

  # --- stage 3: prompts + semantic decoder ---------------------------------------------
  def segment(self, fusion, image_embeddings, out_hw: Tuple[int, int]):
    """Fusion (B, h, w, d_c) + SAM embeddings -> dict(logits (B, H, W, K), low_res
    (B, K, 4e, 4e), class_logits (B, K), points (B, k, 2), saliency (B, h, w))."""
    s = self.sam.img_size
    content = self.content_hw(out_hw[0], out_hw[1])  # fused image inside SAM frame
    mask_size = 4 * self.sam.image_embedding_size
    dense_in = dense_prompt_input(fusion, content, mask_size)  # (B, 4e, 4e, d_c)
    h, w = fusion.shape[1:3]
    pe = self.prompt_encoder.pe_layer
    tokens, coords, saliency = self.point_prompt(
        fusion, lambda c: pe.forward_with_coords(c, (s, s)),
        self.prompt_encoder.point_embeddings[1].embedding[0],
        (content[0] / h, content[1] / w))
    _, dense = self.prompt_encoder(None, None, dense_in)
    high_res = None
    if self.sam2 is not None:
      image_embeddings, high_res = image_embeddings[0], tuple(image_embeddings[1:])
    masks, class_logits = self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(),
                                            tokens, dense, fusion.mean(axis=(1, 2)), high_res)
    # As SAM's postprocess (to the padded frame, crop the content, resize to (H, W)), as one
    # linear map per axis.
    up = postprocess_masks(masks, s, content, tuple(out_hw))  # (B, H, W, K)
    logits = up + class_logits[:, None, None, :]
    return dict(logits=logits, low_res=masks, class_logits=class_logits, points=coords,
                saliency=saliency)

  def __call__(self, images: Mapping[str, Any], image_embeddings=None):
    """Full forward. images: {m: (B, H, W, C_m)} in [0, 1]. Pass cached `image_embeddings`
    to skip the SAM encoder."""
    latents = self.tokenize(images)
    fz = self.fuse(latents, images)
    if image_embeddings is None:
      image_embeddings = self.image_embeddings(fz["fused"])
    hw = images[self.modalities[0]].shape[1:3]
    out = self.segment(fz["fusion"], image_embeddings, hw)
    out.update(fused=fz["fused"], fusion=fz["fusion"], image_embeddings=image_embeddings)
    return out

  def init_all(self, images, with_image_encoder: bool = True):
    """Touches every submodule (init helper): tokenizers with reconstruction, full forward.
    With `with_image_encoder=False` the SAM encoder is skipped (zero embeddings stand in),
    so its params are not created; see `init_params`."""
    if self.tokenizer_kind == "lstg":
      for m in self.modalities:
        self.tokenizer(images[m], m)
    if with_image_encoder:
      return self(images)
    b = images[self.modalities[0]].shape[0]
    emb = jax.tree.map(lambda a: jnp.zeros((b,) + a.shape[1:], a.dtype),
                       image_embedding_shapes(self))
    return self(images, emb)


def postprocess_matrix(n_low: int, frame: int, content: int, out: int) -> np.ndarray:
  """(out, n_low) float32 matrix of SAM's postprocess along one axis: bilinear resize
  n_low -> frame, keep the first `content` rows, bilinear resize content -> out (both
  `jax.image.resize(..., "linear", antialias=False)`, as `Sam.postprocess_masks`).
  Composed in numpy from `interp.bilinear_matrix` (PyTorch's bilinear, align_corners=False,
  which is also jax's "linear" without antialiasing): built op by op in JAX it compiled ~25
  tiny programs per call when a step was first traced."""
  m = (bilinear_matrix(out, content).astype(np.float64)
       @ bilinear_matrix(frame, n_low)[:content].astype(np.float64))
  return m.astype(np.float32)


def postprocess_masks(masks, frame: int, content: Tuple[int, int], out_hw: Tuple[int, int]):
  """(B, K, n, n) low-res mask logits -> (B, H, W, K) at the input size.

  Equals resize to (frame, frame), crop to `content`, resize to `out_hw` (SAM's
  postprocess), computed as ``M_h @ m @ M_w^T`` with the composed per-axis matrices: ~10x
  fewer FLOPs than materialising the (B, K, 1024, 1024) frame, forward and backward.
  """
  n_h, n_w = masks.shape[2:]
  m_h = postprocess_matrix(n_h, frame, content[0], out_hw[0])  # (H, n)
  m_w = postprocess_matrix(n_w, frame, content[1], out_hw[1])  # (W, n)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("hi,bkij->bkhj", m_h, masks, precision=hi)
  return jnp.einsum("bkhj,wj->bhwk", x, m_w, precision=hi)


def sam_heads_config(cfg: Sam2Config) -> SamConfig:
  """A SamConfig with SAM 2's prompt-encoder / mask-decoder sizes and input size (its
  encoder fields are unused: the SAM 2 backbone is `Sam2FeatureEncoder`)."""
  return SamConfig(img_size=cfg.image_size, patch_size=cfg.backbone_stride,
                   prompt_embed_dim=cfg.d_model, mask_in_chans=cfg.mask_in_chans)


def sam2_backbone_config(backbone: str) -> Optional[Sam2Config]:
  """``model.backbone`` -> the SAM 2 preset ("sam2_hiera_l" -> hiera_l, "sam2_tiny" ->
  tiny), or None for "sam" (SAM's ViT of ``model.sam_variant``). Raises ValueError."""
  if backbone == "sam":
    return None
  name = backbone[len("sam2_"):] if backbone.startswith("sam2_") else None
  if name not in SAM2_PRESETS:
    raise ValueError(f"model.backbone {backbone!r}: expected 'sam' or one of "
                     + ", ".join(f"'sam2_{n}'" for n in SAM2_PRESETS))
  return SAM2_PRESETS[name]


def sam_config_from(model_cfg) -> SamConfig:
  variant = model_cfg.get("sam_variant", "tiny")
  if variant not in SAM_PRESETS:
    raise ValueError(f"model.sam_variant {variant!r}: expected one of {sorted(SAM_PRESETS)}")
  return SAM_PRESETS[variant]


def build_model(model_cfg, sam_config: Optional[SamConfig] = None) -> FusionSAM:
  """FusionSAM from `config.model` (a ConfigDict or dict). With ``backbone="sam2_*"`` the
  SAM size (`sam_config`, ``sam_variant``) is not used."""
  g = model_cfg.get
  sam2 = sam2_backbone_config(g("backbone", "sam") or "sam")
  modalities = tuple(g("modalities"))
  fusion = fusion_module(g("fusion", "fmp"), len(modalities))
  if sam2 is not None:
    sam_config = sam_heads_config(sam2)
  return FusionSAM(
      modalities=modalities, num_classes=int(g("num_classes")),
      sam=sam_config or sam_config_from(model_cfg), sam2=sam2, scale=int(g("scale", 4)),
      tokenizer_kind=g("tokenizer_kind", "lstg"),
      tokenizer_kwargs=_frozen(g("tokenizer", {}) or {}), fusion=g("fusion", "fmp"),
      fusion_kwargs=_frozen((g(fusion.options, {}) or {}) if fusion.options else {}),
      fused_decoder_kwargs=_frozen(g("fused_decoder", {}) or {}),
      encoder_dtype=g("encoder_dtype", "float32"), fusion_dtype=g("fusion_dtype", "float32"),
      train_dtype=str(check_train_dtype(g("train_dtype", "float32") or "float32")),
      attn_impl=g("attn_impl", "xla"),
      num_points=int(g("num_points", 8)), fused_color=g("fused_color", "decoder"),
      train_sam_encoder=bool(g("train_sam_encoder", False)))


def param_layout(model_cfg) -> ParamLayout:
  """The `ParamLayout` of `config.model` (a ConfigDict or dict)."""
  g = model_cfg.get
  return ParamLayout.build(tuple(g("modalities")), g("tokenizer_kind", "lstg") or "lstg",
                           g("fusion", "fmp") or "fmp")


def dummy_images(model: FusionSAM, image_hw: Tuple[int, int], batch: int = 1):
  return {m: jnp.zeros((batch,) + tuple(image_hw) + (CHANNELS[m],), jnp.float32)
          for m in model.modalities}


def _sam2_attn_impl(attn_impl: str) -> str:
  """model.attn_impl -> the SAM 2 trunk's attention ("xla" | "auto" | "fused"). cuDNN
  becomes "auto" (cuDNN from 128 keys, XLA for the small windows): Hiera-L bf16 at batch 8
  on an H200, 7.39 against 7.76 ms per image with cuDNN everywhere
  (benchmarks/results/sam2_encoder_attn_h200.json)."""
  impl = resolve_attn_impl(attn_impl)
  return "xla" if impl == "xla" else "auto" if impl.startswith("cudnn") else "fused"


def image_encoder_of(model: FusionSAM) -> nn.Module:
  """A stand-alone copy of the model's image encoder (same sizes, dtype, attention): SAM's
  ViT, or `Sam2FeatureEncoder` for a SAM 2 backbone."""
  dtype = jnp.dtype(model.encoder_dtype)
  if model.sam2 is not None:
    c = model.sam2
    return Sam2FeatureEncoder(c.trunk_kwargs(), c.d_model, tuple(c.fpn_top_down_levels),
                              c.scalp, dtype=dtype, attn_impl=_sam2_attn_impl(model.attn_impl))
  return make_image_encoder(model.sam, dtype, model.attn_impl)


def _encoder_input(model: FusionSAM):
  s = model.sam.img_size
  return jnp.zeros((1, s, s, 3), jnp.float32)


def abstract_image_encoder_params(model: FusionSAM):
  """Shapes and dtypes (`jax.ShapeDtypeStruct`) of the image encoder's params: traced only."""
  enc = image_encoder_of(model)
  return jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), _encoder_input(model))["params"])


def image_embedding_shapes(model: FusionSAM):
  """The encoder output for one image (`jax.ShapeDtypeStruct`s, float32): (1, e, e, C) for
  SAM, the tuple of three levels (module docstring) for SAM 2."""
  e, c = model.sam.image_embedding_size, model.sam.prompt_embed_dim
  f = lambda n, ch: jax.ShapeDtypeStruct((1, n, n, ch), jnp.float32)
  if model.sam2 is None:
    return f(e, c)
  return (f(e, c), f(4 * e, c // 8), f(2 * e, c // 4))


#: Flax's initializer for each SAM image-encoder leaf name (nn.Dense / nn.Conv kernels:
#: lecun_normal; biases, pos_embed, rel_pos_*: zeros; LayerNorm scales: ones).
_ENCODER_LEAF_INIT = {
    "kernel": nn.initializers.lecun_normal(), "bias": nn.initializers.zeros,
    "scale": nn.initializers.ones, "pos_embed": nn.initializers.zeros,
    "rel_pos_h": nn.initializers.zeros, "rel_pos_w": nn.initializers.zeros,
    # SAM 2's Hiera / Sam2FeatureEncoder
    "pos_embed_window": nn.initializers.zeros, "no_mem_embed": nn.initializers.normal(0.02),
}


def random_image_encoder_params(model: FusionSAM, rng):
  """The image encoder's params drawn leaf by leaf from Flax's initializers.

  Same tree, shapes, dtypes and distributions as ``encoder.init`` (not the same values),
  without tracing or compiling the encoder's forward at 1024 x 1024: for ViT-H that compile
  is what made the old whole-model init take minutes on a GPU.
  """
  shapes = abstract_image_encoder_params(model)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  inits = []
  for path, leaf in flat:
    name = getattr(path[-1], "key", str(path[-1]))
    if name not in _ENCODER_LEAF_INIT:
      where = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(f"image_encoder/{where}: no initializer known for a leaf named "
                       f"{name!r}; add it to _ENCODER_LEAF_INIT")
    inits.append(_ENCODER_LEAF_INIT[name])
  treedef = jax.tree.structure(shapes)

  def fill(r):
    keys = jax.random.split(r, len(flat))
    return jax.tree.unflatten(treedef, [f(k, x.shape, x.dtype) for f, k, (_, x)
                                        in zip(inits, keys, flat)])
  return run_once(fill, rng)


def init_params(model: FusionSAM, rng, image_hw: Tuple[int, int], *,
                image_encoder: str = "random"):
  """Random params for every part (SAM parts too: load real ones with load_sam_weights).

  image_encoder: "random" (Flax's initializers, `random_image_encoder_params`) or
  "abstract" (`jax.ShapeDtypeStruct` leaves, for `load_sam_weights` to fill: real runs load
  SAM's encoder, so drawing random values for its 632 M ViT-H params is wasted work).
  """
  if image_encoder not in ("random", "abstract"):
    raise ValueError(f"image_encoder must be 'random' or 'abstract', got {image_encoder!r}")
  rest = run_once(lambda r: model.init(r, dummy_images(model, image_hw), False,
                                       method=FusionSAM.init_all)["params"], rng)
  rest = dict(rest)
  rest["image_encoder"] = (random_image_encoder_params(model, jax.random.fold_in(rng, 1))
                           if image_encoder == "random" else abstract_image_encoder_params(model))
  return rest


def make_discriminator(model_cfg) -> PatchGANDiscriminator:
  d = dict(model_cfg.get("discriminator", {}) or {})
  return PatchGANDiscriminator(**d)


def init_discriminators(model_cfg, rng, image_hw: Tuple[int, int]):
  """{m: PatchGAN params} for each modality (stage 1's adversarial loss)."""
  disc = make_discriminator(model_cfg)
  out = {}
  for i, m in enumerate(model_cfg.get("modalities")):
    x = jnp.zeros((1,) + tuple(image_hw) + (CHANNELS[m],), jnp.float32)
    out[m] = disc.init(jax.random.fold_in(rng, i), x)["params"]
  return out


def _take(own, loaded, where: str):
  """`own`'s tree with each leaf replaced by `loaded`'s leaf at the same path.

  The result has exactly `own`'s structure (what `init_params` and every checkpoint template
  build): SAM subtrees the model never uses (e.g. the prompt encoder's padding-point
  embedding) are left out rather than grafted in. Raises CheckpointError when a leaf the
  model has is missing in `loaded` or has another shape."""
  if not isinstance(own, Mapping):
    if np.shape(own) != np.shape(loaded):
      raise CheckpointError(f"SAM weights: {where} has shape {tuple(np.shape(loaded))}, the "
                            f"model expects {tuple(np.shape(own))}")
    # device_put, not jnp.asarray: that compiles a program per distinct shape for numpy input.
    return jax.device_put(loaded)
  if not isinstance(loaded, Mapping):
    raise CheckpointError(f"SAM weights: {where} is a leaf, the model expects a subtree")
  missing = sorted(set(own) - set(loaded))
  if missing:
    raise CheckpointError(f"SAM weights: {where} lacks {missing} that the model needs")
  return {k: _take(own[k], loaded[k], f"{where}/{k}") for k in own}


def converted_sam_parts(ckpt_dir: str):
  """(config, {"image_encoder", "prompt_encoder", "mask_decoder"}) of a converted SAM
  directory, or of a converted SAM 2 one (`tools/convert_sam2_weights.py`), whose parts are
  arranged as FusionSAM's SAM 2 backbone holds them: image_encoder = trunk + neck +
  sam_mask_decoder's conv_s0 / conv_s1 + no_mem_embed (`Sam2FeatureEncoder`)."""
  if not os.path.isfile(os.path.join(ckpt_dir, sam2_checkpoint.META_FILE)):
    return load_sam_checkpoint(ckpt_dir)
  cfg, p = sam2_checkpoint.load_sam2_checkpoint(ckpt_dir)
  dec = p["sam_mask_decoder"]
  enc = dict(p["image_encoder"], conv_s0=dec["conv_s0"], conv_s1=dec["conv_s1"],
             no_mem_embed=p["no_mem_embed"])
  return cfg, {"image_encoder": enc, "prompt_encoder": p["sam_prompt_encoder"],
               "mask_decoder": dec}


def load_sam_weights(params, sam_ckpt_dir: str, model_cfg=None):
  """Copies converted SAM (or SAM 2, `converted_sam_parts`) weights into FusionSAM's
  SAM-derived parts; the returned tree has exactly the structure of `params` (leaves may be
  `jax.ShapeDtypeStruct`s to fill).

  image_encoder: as is. prompt_encoder: the parts the model has, as is, except
  mask_downscaling's first conv, which takes d_c channels here: SAM's 1-channel kernel is
  spread over the d_c inputs (divided by d_c, so a constant map gives SAM's response).
  mask_decoder: transformer and output_upscaling as is; class token i and hypernetwork MLP i
  start from SAM's mask token / MLP (i mod num_mask_tokens). Raises CheckpointError if the
  sizes don't fit.
  """

  cfg, sam = converted_sam_parts(sam_ckpt_dir)
  if jax.tree.map(np.shape, sam["image_encoder"]) != jax.tree.map(np.shape, params["image_encoder"]):
    raise CheckpointError(
        f"{sam_ckpt_dir}: the checkpoint is {cfg} but the model's image encoder has a "
        "different size or kind; set model.backbone (and for SAM model.sam_variant) to match")
  new = dict(params)
  new["image_encoder"] = _take(params["image_encoder"], sam["image_encoder"], "image_encoder")
  pr = dict(sam["prompt_encoder"])
  k0 = np.asarray(pr["mask_downscaling"]["layers_0"]["kernel"])  # (2, 2, 1, c)
  d_c = params["prompt_encoder"]["mask_downscaling"]["layers_0"]["kernel"].shape[2]
  md = dict(pr["mask_downscaling"])
  md["layers_0"] = dict(md["layers_0"], kernel=np.repeat(k0, d_c, axis=2) / d_c)
  pr["mask_downscaling"] = md
  new["prompt_encoder"] = _take(params["prompt_encoder"], pr, "prompt_encoder")
  sd = sam["mask_decoder"]
  mask_tokens = np.asarray(sd["mask_tokens"]["embedding"])
  k = params["mask_decoder"]["class_tokens"].shape[0]
  n_mlps = len(mask_tokens)
  dec = {"transformer": sd["transformer"], "output_upscaling": sd["output_upscaling"],
         "class_tokens": mask_tokens[np.arange(k) % n_mlps]}
  for i in range(k):
    dec[f"output_hypernetworks_mlps_{i}"] = sd[f"output_hypernetworks_mlps_{i % n_mlps}"]
  own = params["mask_decoder"]
  new["mask_decoder"] = {
      key: (_take(own[key], dec[key], f"mask_decoder/{key}") if key in dec else own[key])
      for key in own}
  return new
