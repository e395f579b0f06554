"""The three training stages of FusionSAM: what each trains and the loss it minimises.

  tokenizer     LSTG per modality: Eq. 5 reconstruction + Eq. 6 codebook/commitment
                + Eq. 7 perceptual (only with user-provided VGG16 weights) + Eq. 8
                adversarial (PatchGAN, VQGAN adaptive weight, discriminator start step).
  fusion        FMP + fused-image decoder, tokenizers frozen: SwinFusion-style fusion loss
                (SSIM, max intensity, max Sobel gradient) = Eq. 1's f_f.
  segmentation  fusion prompts + semantic mask decoder (+ FMP unless frozen), SAM encoder
                frozen: cross-entropy (ignore 255) + Dice = Eq. 1's f_s.

Every loss function has the training step's signature
`loss_fn(params, batch, rng, step) -> (loss, aux)`; batches are dicts of uint8 images
`{m: (B, H, W, C_m)}` and int32 `label` (B, H, W).
"""

from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp

from fusionsam_jax import losses
from fusionsam_jax.models.fusionsam import FusionSAM, make_discriminator

STAGES = ("tokenizer", "fusion", "segmentation")
# Prompt-encoder parts that train: the dense-prompt stack and the foreground point embedding
# (SAM's random-Fourier matrix stays a fixed buffer; the dense prompt is always given, so
# no_mask_embed is unused).
_PROMPT_TRAINABLE = ["prompt_encoder/mask_downscaling", "prompt_encoder/point_embeddings_1"]


def _fusion_module(model_cfg) -> str:
  single = len(tuple(model_cfg.get("modalities"))) < 2
  return "concat_fusion" if single or model_cfg.get("fusion", "fmp") == "concat" else "fmp"


def trainable(stage: str, model_cfg) -> List[str]:
  """Top-level param subtrees trained in `stage` (empty: the stage has nothing to train)."""
  mods = tuple(model_cfg.get("modalities"))
  patch = model_cfg.get("tokenizer_kind", "lstg") == "patch"
  if stage == "tokenizer":
    return [] if patch else [f"tokenizer_{m}" for m in mods]
  fusion = [_fusion_module(model_cfg)] + ([f"patch_embed_{m}" for m in mods] if patch else [])
  if stage == "fusion":
    return fusion + ["fused_decoder"]
  if stage == "segmentation":
    names = ["point_prompt", "mask_decoder"] + _PROMPT_TRAINABLE
    if not model_cfg.get("freeze_fmp_in_segmentation", True):
      names += fusion
    return names
  raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def inputs_from_batch(batch: Mapping[str, Any], modalities) -> Dict[str, jax.Array]:
  """uint8 images -> float32 in [0, 1], one entry per modality."""
  return {m: jnp.asarray(batch[m]).astype(jnp.float32) / 255.0 for m in modalities}


def _latents(model: FusionSAM, params, images):
  return model.apply({"params": params}, images, method=FusionSAM.tokenize)


def tokenizer_losses(model: FusionSAM, model_cfg, stage_cfg, perceptual=None):
  """(g_loss_fn, d_loss_fn) for `training.make_gan_train_step`.

  g params: the whole model tree (only tokenizer_<m> is trained); d params: {m: PatchGAN}.
  `perceptual`: a `vgg.PerceptualLoss` or None (then the Eq. 7 term is off).
  """
  mods = tuple(model_cfg.get("modalities"))
  disc = make_discriminator(model_cfg)
  rec_w = float(stage_cfg.get("rec_weight", 1.0))
  perc_w = float(stage_cfg.get("perceptual_weight", 1.0)) if perceptual is not None else 0.0
  disc_w = float(stage_cfg.get("disc_weight", 0.8))
  disc_start = losses.disc_start_step(
      stage_cfg.get("disc_start", None), stage_cfg.get("num_steps", None),
      float(stage_cfg.get("disc_start_fraction", 0.5)), disc_w)
  rec_kind = stage_cfg.get("rec_loss", "l2")
  num_codes = int(dict(model_cfg.get("tokenizer", {})).get("num_codes", 1024))

  def g_loss_fn(g, d, batch, rng, step):
    images = inputs_from_batch(batch, mods)
    total, aux, carry = 0.0, {}, {}
    for m in mods:
      x = images[m]
      out = model.apply({"params": g}, x, m, method=FusionSAM.tokenizer)
      recon = out["recon"]

      def nll_of(r, x=x):
        rec = losses.reconstruction_loss(x, r, rec_kind)  # Eq. 5
        if perceptual is not None:
          return rec_w * rec + perc_w * jnp.mean(perceptual(x, r)), rec
        return rec_w * rec, rec

      def adv_of(r, m=m):  # Eq. 8, generator side
        return losses.generator_adv_loss(disc.apply({"params": d[m]}, r))

      nll, rec = nll_of(recon)
      g_adv = adv_of(recon)
      w_disc = losses.adopt_weight(disc_w, step, disc_start)
      if disc_w > 0:
        # VQGAN's adaptive weight from gradients w.r.t. the decoder's last layer.
        gs = jax.lax.stop_gradient(g)
        kernel = gs[f"tokenizer_{m}"]["decoder"]["conv_out"]["kernel"]

        def recon_of(kern, m=m, x=x):
          p = dict(gs)
          tok = dict(p[f"tokenizer_{m}"])
          dec = dict(tok["decoder"])
          dec["conv_out"] = dict(dec["conv_out"], kernel=kern)
          tok["decoder"] = dec
          p[f"tokenizer_{m}"] = tok
          return model.apply({"params": p}, x, m, method=FusionSAM.tokenizer)["recon"]

        r0, pullback = jax.vjp(recon_of, kernel)
        g_nll = pullback(jax.grad(lambda r: nll_of(r)[0])(r0))[0]
        g_g = pullback(jax.grad(adv_of)(r0))[0]
        lam = losses.adaptive_adv_weight(jnp.linalg.norm(g_nll), jnp.linalg.norm(g_g))
      else:
        lam = jnp.zeros(())
      loss_m = nll + out["vq_loss"] + w_disc * lam * g_adv
      total = total + loss_m
      usage = losses.codebook_usage(out["indices"], num_codes)
      aux.update({f"{m}/rec": rec, f"{m}/codebook": out["codebook_loss"],
                  f"{m}/commitment": out["commitment_loss"], f"{m}/g_adv": g_adv,
                  f"{m}/adaptive_weight": lam, f"{m}/perplexity": usage["perplexity"],
                  f"{m}/dead_codes": usage["dead_fraction"]})
      carry[m] = recon
    return total, (aux, carry)

  def d_loss_fn(d, carry, batch, rng, step):
    images = inputs_from_batch(batch, mods)
    total, aux = 0.0, {}
    w = losses.adopt_weight(1.0, step, disc_start)
    for m in mods:
      real = disc.apply({"params": d[m]}, images[m])
      fake = disc.apply({"params": d[m]}, carry[m])
      loss_m = losses.hinge_d_loss(real, fake)
      total = total + w * loss_m
      aux[f"{m}/d_hinge"] = loss_m
    return total, aux

  return g_loss_fn, d_loss_fn


def codebook_restart_fn(model: FusionSAM, model_cfg, stage_cfg):
  """`g_post_update` for `training.make_gan_train_step`: after each tokenizer update, the
  codes of each modality's codebook unused in the batch restart at random encodings of the
  batch (`lstg.restart_dead_codes`; Jukebox / SoundStream). None unless
  ``stage_cfg.restart_dead_codes``. Aux: ``<m>/restarted_codes``."""
  if not stage_cfg.get("restart_dead_codes", False):
    return None
  from fusionsam_jax.models.fusionsam import CHANNELS  # noqa: PLC0415
  from fusionsam_jax.models.lstg import LatentTokenizer, restart_dead_codes  # noqa: PLC0415
  mods = tuple(model_cfg.get("modalities"))
  thr = float(stage_cfg.get("restart_threshold", 1.0))
  toks = {m: LatentTokenizer(in_channels=CHANNELS[m], scale=model.scale,
                             **dict(model.tokenizer_kwargs)) for m in mods}

  def fn(g, batch, rng):
    images = inputs_from_batch(batch, mods)
    g, aux = dict(g), {}
    for i, m in enumerate(mods):
      g[f"tokenizer_{m}"], n = restart_dead_codes(
          toks[m], g[f"tokenizer_{m}"], images[m], jax.random.fold_in(rng, i), threshold=thr)
      aux[f"{m}/restarted_codes"] = n.astype(jnp.float32)
    return g, aux

  return fn


def fusion_loss_fn(model: FusionSAM, model_cfg, stage_cfg):
  """Stage 2: fusion loss of the fused image against every source modality."""
  mods = tuple(model_cfg.get("modalities"))
  weights = stage_cfg.get("weights", None)
  weights = dict(weights) if weights else None

  def loss_fn(params, batch, rng, step=None):
    images = inputs_from_batch(batch, mods)
    latents = jax.lax.stop_gradient(_latents(model, params, images))
    out = model.apply({"params": params}, latents, images, method=FusionSAM.fuse)
    total, terms = losses.fusion_loss(out["fused"], [images[m] for m in mods], weights)
    return total, {k: v for k, v in terms.items()}

  return loss_fn


_FUSION_PATH = ("tokenizer_", "patch_embed_", "fmp", "concat_fusion", "fused_decoder")


def frozen_fusion(model: FusionSAM, params, images):
  """Tokenizers -> fusion -> fused decoder, forward only, computed in `model.fusion_dtype`.

  The path the segmentation stage, the embedding cache and evaluation run with the fusion
  modules frozen. With ``fusion_dtype="bfloat16"`` the path's params and input images are
  cast to bf16 (convolutions, attention and matmuls then run in bf16; GroupNorm / LayerNorm
  statistics and the codebook search stay float32); outputs come back as float32
  ``dict(fusion (B, h, w, d_c), fused (B, H, W, 3))``, under stop-gradient.
  """
  dtype = jnp.dtype(model.fusion_dtype)
  if dtype != jnp.float32:
    params = {k: (jax.tree.map(lambda x: x.astype(dtype), v) if k.startswith(_FUSION_PATH)
                  else v) for k, v in params.items()}
    images = {m: x.astype(dtype) for m, x in images.items()}
  latents = _latents(model, params, images)
  out = model.apply({"params": params}, latents, images, method=FusionSAM.fuse)
  return jax.lax.stop_gradient({k: v.astype(jnp.float32) for k, v in out.items()})


def _fuse_for_segmentation(model, model_cfg, params, images):
  if model_cfg.get("freeze_fmp_in_segmentation", True):
    return frozen_fusion(model, params, images)
  latents = jax.lax.stop_gradient(_latents(model, params, images))
  return model.apply({"params": params}, latents, images, method=FusionSAM.fuse)


def segmentation_loss_fn(model: FusionSAM, model_cfg, stage_cfg):
  """Stage 3: CE + Dice on the semantic logits. Uses `batch["image_embeddings"]` when the
  embedding cache provides it, and skips the fusion path too when the cache also provides
  the fusion latents `batch["fusion"]` (B, h, w, d_c) (see `cache_fn`)."""
  mods = tuple(model_cfg.get("modalities"))
  dice_w = float(stage_cfg.get("dice_weight", 1.0))

  def loss_fn(params, batch, rng, step=None):
    get = batch.get if hasattr(batch, "get") else (lambda k: None)
    emb, fusion = get("image_embeddings"), get("fusion")
    if fusion is not None and emb is not None:
      # Both cached (frozen fusion path): no tokenizer, FMP or encoder work in the step.
      fusion = jax.lax.stop_gradient(fusion)
    else:
      fz = _fuse_for_segmentation(model, model_cfg, params, inputs_from_batch(batch, mods))
      fusion = fz["fusion"]
      if emb is None:
        emb = model.apply({"params": params}, fz["fused"], method=FusionSAM.image_embeddings)
    hw = batch["label"].shape[1:3]
    out = model.apply({"params": params}, fusion, emb, hw, method=FusionSAM.segment)
    total, terms = losses.segmentation_loss(out["logits"], batch["label"], dice_weight=dice_w)
    return total, {k: v for k, v in terms.items() if k != "num_valid"}

  return loss_fn


def embed_fn(model: FusionSAM):
  """fn(params, batch) -> SAM image embeddings of the fused image (what the cache stores).

  Depends only on the tokenizer, fusion, fused_decoder and image_encoder params."""
  cached = cache_fn(model)

  def fn(params, batch):
    return cached(params, batch)["image_embeddings"]

  return fn


def cache_fn(model: FusionSAM):
  """fn(params, batch) -> dict(image_embeddings (B, e, e, C), fusion (B, h, w, d_c)): what
  the segmentation stage's cache stores for a view (both fixed while the fusion path is
  frozen). Depends on the same params as `embed_fn`."""
  mods = model.modalities

  def fn(params, batch):
    fz = frozen_fusion(model, params, inputs_from_batch(batch, mods))
    emb = model.apply({"params": params}, fz["fused"], method=FusionSAM.image_embeddings)
    return dict(image_embeddings=emb, fusion=fz["fusion"])

  return fn


def embedding_dependencies(params) -> Dict[str, Any]:
  """The param subtrees the cached embeddings depend on (hash these to key the cache)."""
  keys = [k for k in params if k.startswith(_FUSION_PATH) or k == "image_encoder"]
  return {k: params[k] for k in sorted(keys)}


def predict_fn(model: FusionSAM):
  """fn(params, batch) -> dict(logits (B,H,W,K), pred (B,H,W) int32, fused (B,H,W,3),
  probs (B,H,W,K)). Uses `batch["image_embeddings"]` when present."""
  mods = model.modalities

  def fn(params, batch):
    images = inputs_from_batch(batch, mods)
    emb = batch.get("image_embeddings") if hasattr(batch, "get") else None
    fz = frozen_fusion(model, params, images)
    if emb is None:
      emb = model.apply({"params": params}, fz["fused"], method=FusionSAM.image_embeddings)
    hw = images[mods[0]].shape[1:3]
    logits = model.apply({"params": params}, fz["fusion"], emb, hw,
                         method=FusionSAM.segment)["logits"]
    return dict(logits=logits, pred=jnp.argmax(logits, -1).astype(jnp.int32),
                probs=jax.nn.softmax(logits, -1), fused=fz["fused"])

  return fn
