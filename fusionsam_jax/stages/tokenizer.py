"""Stage 1: one LSTG tokenizer per modality (paper Sec. 3.2.2).

Loss per modality: Eq. 5 reconstruction + Eq. 6 codebook / commitment + Eq. 7 perceptual
(VGG16 features from a user file; off otherwise, said once) + Eq. 8 adversarial (PatchGAN,
hinge, VQGAN's adaptive weight, from ``disc_start`` on; with ``disc_weight`` 0 the
discriminator is never run); in the paper configs also the codebook's entropy penalty
(``vq_loss``, `lstg.entropy_penalty`). State: ``{"generator": {tokenizer_<m>},
"discriminator": {m: PatchGAN}}``; nothing else is read. At the stage's end a val pass
reports each codebook's use and the reconstruction error (`codebook_eval`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax import losses
from fusionsam_jax.data.spec import (eval_iterable, stage_batch_size, stage_crop_size,
                                     stage_steps, train_iterator)
from fusionsam_jax.errors import SetupError
from fusionsam_jax.jit_utils import run_once
from fusionsam_jax.models import factory, functional as F, vgg
from fusionsam_jax.models.functional import inputs_from_batch
from fusionsam_jax.models.fusionsam import (CHANNELS, FusionSAM, init_discriminators,
                                            make_discriminator, param_layout)
from fusionsam_jax.models.layout import tokenizer_key
from fusionsam_jax.models.lstg import LatentTokenizer, restart_dead_codes
from fusionsam_jax.models.precision import cast_floating
from fusionsam_jax.models.sam_perceptual import Sam2PerceptualLoss, SamPerceptualLoss
from fusionsam_jax.stages import common
from fusionsam_jax.training import mesh as mesh_lib
from fusionsam_jax.training.state import init_optimizer, TrainState

NAME = "tokenizer"


def trainable(model_cfg) -> tuple[str, ...]:
  """The LSTG tokenizers (``ParamLayout.tokenizers``; none with patch embeddings)."""
  return param_layout(model_cfg).tokenizers


def disc_start(config, num_steps: int) -> int:
  """``disc_start`` (steps) when set, else ``disc_start_fraction`` of the stage's steps;
  raises ValueError when the discriminator would never train (`losses.disc_start_step`)."""
  sc = config.train.stages[NAME]
  return losses.disc_start_step(sc.get("disc_start"), num_steps,
                                float(sc.get("disc_start_fraction", 0.5)),
                                float(sc.get("disc_weight", 0.8)))


def perceptual_loss(config, say):
  """Eq. 7's feature network: `vgg.PerceptualLoss` from ``config.perceptual_weights``;
  without it the frozen encoder's first ``perceptual_sam_blocks`` blocks when the run has
  converted weights of its backbone: SAM's ViT (`sam_perceptual.SamPerceptualLoss`) or, on
  a SAM 2 backbone, SAM 2's Hiera (`sam_perceptual.Sam2PerceptualLoss`, at most its first
  stage); else None (a random encoder gives random features: the loss is off, said once)."""
  path = config.get("perceptual_weights")
  sam_ckpt = config.model.get("sam_checkpoint")
  blocks = int(config.get("perceptual_sam_blocks", 2) or 2)
  if not path and factory.backbone(config) != "sam":
    # FusionSAM on SAM 2: the run's own (SAM 2) encoder gives the features.
    sam2_ckpt = config.model.get("sam2_checkpoint")
    if sam2_ckpt:
      loss = Sam2PerceptualLoss.from_checkpoint(
          sam2_ckpt, num_blocks=blocks,
          dtype=jnp.dtype(config.model.encoder_dtype), attn_impl=config.model.attn_impl)
      say(f"Perceptual loss (Eq. 7): features of the frozen SAM 2 encoder's first "
          f"{loss.num_blocks} Hiera blocks ({sam2_ckpt}); no VGG16 weights given")
      return loss
    sam_ckpt = None   # SAM's ViT is not this run's encoder
  if not path and sam_ckpt:
    say(f"Perceptual loss (Eq. 7): features of the frozen SAM encoder's first {blocks} "
        f"blocks ({sam_ckpt}); no VGG16 weights given")
    return SamPerceptualLoss.from_checkpoint(
        sam_ckpt, num_blocks=blocks, dtype=jnp.dtype(config.model.encoder_dtype),
        attn_impl=config.model.attn_impl)
  if not path:
    say("Perceptual loss (Eq. 7) is OFF: no VGG16 weights given (convert torchvision's VGG16 "
        "once with tools/convert_vgg16.py and pass --config.perceptual_weights=FILE.npz)")
    return None
  if not os.path.isfile(path):
    raise SetupError(f"perceptual_weights {path!r} does not exist; convert VGG16 with "
                     f"`python tools/convert_vgg16.py --weights vgg16.pth --output {path}`, or "
                     "set --config.perceptual_weights='' to train without it")
  return vgg.PerceptualLoss.from_file(path)


def losses_fn(model: FusionSAM, model_cfg, stage_cfg, start: int, perceptual=None):
  """(g_loss_fn, d_loss_fn) for `common.make_gan_train_step`. Tokenizers and discriminators
  compute in ``model.train_dtype`` over float32 params; reconstructions, logits and every
  loss term are float32 (`models.precision`)."""
  mods = tuple(model_cfg.modalities)
  disc = make_discriminator(model_cfg)
  dt = jnp.dtype(model.train_dtype)

  def tokenize(g, x, m):
    out = model.apply({"params": F.cast_fusion_path(model, g, dt)}, x.astype(dt), m,
                      method=FusionSAM.tokenizer)
    return dict(out, recon=out["recon"].astype(jnp.float32))

  def discriminate(d_m, x):
    return disc.apply({"params": cast_floating(d_m, dt)}, x.astype(dt)).astype(jnp.float32)
  rec_w = float(stage_cfg.get("rec_weight", 1.0))
  perc_w = float(stage_cfg.get("perceptual_weight", 1.0)) if perceptual is not None else 0.0
  disc_w = float(stage_cfg.get("disc_weight", 0.8))
  num_codes = int(dict(model_cfg.get("tokenizer", {})).get("num_codes", 1024))
  rec_kind = stage_cfg.get("rec_loss", "l2")

  def g_loss_fn(g, d, batch, rng, step):
    images = inputs_from_batch(batch, mods)
    total, aux, carry = 0.0, {}, {}
    for m in mods:
      x = images[m]
      out = tokenize(g, x, m)

      def nll_of(r, x=x):
        rec = losses.reconstruction_loss(x, r, rec_kind)  # Eq. 5
        if perceptual is not None:
          return rec_w * rec + perc_w * jnp.mean(perceptual(x, r)), rec
        return rec_w * rec, rec

      def adv_of(r, m=m):  # Eq. 8, generator side
        return losses.generator_adv_loss(discriminate(d[m], r))

      nll, rec = nll_of(out["recon"])
      # disc_weight 0: no adversarial term, and the discriminator is not run at all.
      g_adv = adv_of(out["recon"]) if disc_w > 0 else jnp.zeros(())
      w_disc = losses.adopt_weight(disc_w, step, start)
      if disc_w > 0:
        # VQGAN's adaptive weight: gradient norms w.r.t. the decoder's last layer.
        gs = jax.lax.stop_gradient(g)
        kernel = gs[tokenizer_key(m)]["decoder"]["conv_out"]["kernel"]

        def recon_of(kern, m=m, x=x):
          tok = dict(gs[tokenizer_key(m)])
          tok["decoder"] = dict(tok["decoder"], conv_out=dict(tok["decoder"]["conv_out"],
                                                              kernel=kern))
          return tokenize(dict(gs, **{tokenizer_key(m): tok}), x, m)["recon"]

        r0, pullback = jax.vjp(recon_of, kernel)
        g_nll = pullback(jax.grad(lambda r: nll_of(r)[0])(r0))[0]
        g_g = pullback(jax.grad(adv_of)(r0))[0]
        lam = losses.adaptive_adv_weight(jnp.linalg.norm(g_nll), jnp.linalg.norm(g_g))
      else:
        lam = jnp.zeros(())
      total = total + nll + out["vq_loss"] + w_disc * lam * g_adv
      usage = losses.codebook_usage(out["indices"], num_codes)
      aux.update({f"{m}/rec": rec, f"{m}/codebook": out["codebook_loss"],
                  f"{m}/entropy": out["entropy_loss"],
                  f"{m}/commitment": out["commitment_loss"], f"{m}/g_adv": g_adv,
                  f"{m}/adaptive_weight": lam, f"{m}/perplexity": usage["perplexity"],
                  f"{m}/dead_codes": usage["dead_fraction"]})
      carry[m] = out["recon"]
    return total, (aux, carry)

  def d_loss_fn(d, carry, batch, rng, step):
    images = inputs_from_batch(batch, mods)
    total, aux = jnp.zeros(()), {}
    w = losses.adopt_weight(1.0, step, start)
    if disc_w <= 0:   # no adversarial term: zero loss and gradients, nothing computed
      return total, {"d_weight": jnp.zeros(())}
    for m in mods:
      loss_m = losses.hinge_d_loss(discriminate(d[m], images[m]), discriminate(d[m], carry[m]))
      total = total + w * loss_m
      aux[f"{m}/d_hinge"] = loss_m
    aux["d_weight"] = w
    return total, aux

  return g_loss_fn, d_loss_fn


def codebook_restart_fn(model: FusionSAM, model_cfg, stage_cfg):
  """``post_update(g, batch, rng) -> (g, aux)`` for `common.make_gan_train_step`: after
  each update, the codes of each modality's codebook unused in recent batches restart at
  random encodings of the batch (`lstg.restart_dead_codes`; Jukebox / SoundStream). None
  unless ``stage_cfg.restart_dead_codes``. Aux: ``<m>/restarted_codes``."""
  if not stage_cfg.get("restart_dead_codes", False):
    return None
  mods = tuple(model_cfg.modalities)
  thr = float(stage_cfg.get("restart_threshold", 1.0))
  relative = bool(stage_cfg.get("restart_threshold_relative", False))
  code_ema = stage_cfg.get("code_ema", None)
  toks = {m: LatentTokenizer(in_channels=CHANNELS[m], scale=model.scale,
                             **dict(model.tokenizer_kwargs)) for m in mods}

  def fn(g, batch, rng):
    images = inputs_from_batch(batch, mods)
    g, aux = dict(g), {}
    for i, m in enumerate(mods):
      g[tokenizer_key(m)], n = restart_dead_codes(
          toks[m], g[tokenizer_key(m)], images[m], jax.random.fold_in(rng, i), threshold=thr,
          relative=relative, code_ema=None if code_ema is None else float(code_ema),
          compute_dtype=jnp.dtype(model.train_dtype))
      aux[f"{m}/restarted_codes"] = n.astype(jnp.float32)
    return g, aux

  return fn


def codebook_eval(model: FusionSAM, config, spec, mesh):
  """``fn(params) -> metrics`` over the val split at full resolution: per modality the
  codebook's perplexity and dead-code fraction over every real pixel's code (the latent
  positions of padding are not counted) and the reconstruction error (Eq. 5, ``rec_loss``,
  over real pixels). Keys ``<m>/val_perplexity``, ``<m>/val_dead_codes``, ``<m>/val_rec``.
  The batches are split over `mesh` (each process loads its share of val) and the counts
  and sums come back replicated: every process sees the whole split's numbers."""
  mods = tuple(config.model.modalities)
  num_codes = int(dict(config.model.get("tokenizer", {})).get("num_codes", 1024))
  scale = int(config.model.scale)
  l1 = config.train.stages[NAME].get("rec_loss", "l2") == "l1"

  def encode(params, batch):
    images = inputs_from_batch(batch, mods)
    valid = batch["valid"]                                            # (B, H, W)
    out = {}
    for m in mods:
      o = model.apply({"params": params}, images[m], m, method=FusionSAM.tokenizer)
      keep = valid[:, ::scale, ::scale]                               # (B, h, w)
      # Code use over real latent positions: padding goes to an extra, dropped bin.
      idx = jnp.where(keep, o["indices"], num_codes).reshape(-1)
      counts = jax.ops.segment_sum(jnp.ones_like(idx), idx, num_segments=num_codes + 1)
      err = o["recon"].astype(jnp.float32) - images[m]
      err = jnp.abs(err) if l1 else jnp.square(err)
      w = valid[..., None].astype(jnp.float32)
      out[m] = (counts[:num_codes], jnp.sum(err * w), jnp.sum(w) * images[m].shape[-1])
    return out

  repl = mesh_lib.replicated(mesh)
  encode = jax.jit(encode, in_shardings=(repl, mesh_lib.data_sharding(mesh)),
                   out_shardings=repl)

  def fn(params):
    counts = {m: np.zeros(num_codes, np.int64) for m in mods}
    err = {m: [0.0, 0.0] for m in mods}
    params = jax.device_put(common.select(params, trainable(config.model)), repl)  # tokenizers
    for batch in eval_iterable(config, spec.source(str(config.eval.val_split))):
      local = {k: np.asarray(batch[k]) for k in (*mods, "valid")}
      out = jax.device_get(encode(params, mesh_lib.shard_batch(local, mesh)))
      for m, (c, e, n) in out.items():
        counts[m] += np.asarray(c, np.int64)
        err[m][0] += float(e)
        err[m][1] += float(n)
    res = {}
    for m in mods:
      u = losses.usage_from_counts(counts[m])
      res[f"{m}/val_perplexity"] = float(u["perplexity"])
      res[f"{m}/val_dead_codes"] = float(u["dead_fraction"])
      res[f"{m}/val_rec"] = err[m][0] / max(err[m][1], 1.0)
    return res

  return fn


def make(ctx: common.Context) -> common.Stage | None:
  """The tokenizer stage, or None when there is nothing to train (ablation A). The Eq. 7
  feature network is built when ``ctx.perceptual``."""
  config, model, spec = ctx.config, ctx.model, ctx.stage_spec()
  names = trainable(config.model)
  if not names:
    return None
  sc = config.train.stages[NAME]
  num_steps = stage_steps(config, NAME, ctx.train_size)
  start = disc_start(config, num_steps)
  lr = common.stage_lr(config, NAME, num_steps)
  g_tx = common.stage_optimizer(config, NAME, lr)
  # The discriminator's learning rate is 0 before it starts: Adam with L2 decay would
  # otherwise shrink its untrained weights towards 0 for the whole warm-up.
  d_tx = common.stage_optimizer(config, NAME, lr=losses.disc_lr_schedule(float(sc.lr), start))
  key = common.stage_key(config, spec)
  hw = stage_crop_size(config, NAME)

  disc_on = float(sc.get("disc_weight", 0.8)) > 0

  def init_state(params):
    # One compiled init (Flax's op-by-op one built ~90 tiny programs at every start).
    discs = run_once(lambda r: init_discriminators(config.model, r, hw),
                     jax.random.fold_in(key, 7))
    sp = {"generator": params, "discriminator": discs}
    return TrainState(step=jnp.zeros((), jnp.int32), params=sp,
                      opt_state={"g": init_optimizer(g_tx, params),
                                 "d": init_optimizer(d_tx, discs)},
                      rng=jax.random.key_data(key) if jnp.issubdtype(
                          key.dtype, jax.dtypes.prng_key) else key)

  perceptual = perceptual_loss(config, ctx.say) if ctx.perceptual else None
  g_loss, d_loss = losses_fn(model, config.model, sc, start, perceptual)
  return common.Stage(
      name=NAME, num_steps=num_steps, batch_size=stage_batch_size(config, NAME),
      lr=lr, trainable=names, reads=names, init_state=init_state,
      train_step=common.make_gan_train_step(
          g_loss, d_loss, g_tx, d_tx, ctx.mesh,
          post_update=codebook_restart_fn(model, config.model, sc)),
      iterator=lambda params: train_iterator(config, ctx.spec, NAME, spec.rng_offset),
      model_params=lambda state: state.params["generator"],
      # At the stage's end: codebook use and reconstruction error over val.
      eval_fn=(codebook_eval(model, config, ctx.spec, ctx.mesh)
               if sc.get("eval_codebook", True) else None),
      notes=(f"discriminator from step {start}" if disc_on
             else "no adversarial term (disc_weight 0)",),
      images=lambda batch: reconstruction_images(model, config.model.modalities, batch))


def reconstruction_images(model: FusionSAM, modalities, batch):
  """TensorBoard images ``fn(model_params) -> {"<m>/input|reconstruction": (N, H, 2W, 3)}``
  for the first two examples of an eval `batch` (uint8 modalities)."""
  mods = tuple(modalities)
  local = {m: np.asarray(batch[m])[:2] for m in mods}
  recon = jax.jit(lambda p, x: {m: model.apply({"params": p}, x[m], m,
                                               method=FusionSAM.tokenizer)["recon"]
                                for m in mods})

  def fn(params):
    images = inputs_from_batch(local, mods)
    out = jax.device_get(recon(params, images))
    tiles = {}
    for m in mods:
      r = np.round(np.clip(np.asarray(out[m]), 0, 1) * 255).astype(np.uint8)
      pair = np.concatenate([local[m], r], axis=2)
      tiles[f"{m}/input|reconstruction"] = np.repeat(pair, 3, -1) if pair.shape[-1] == 1 \
          else pair
    return tiles

  return fn
