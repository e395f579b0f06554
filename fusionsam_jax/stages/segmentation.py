"""Stage 3: fusion prompts + semantic mask decoder; SAM's image encoder frozen.

Two modes (``model.freeze_fmp_in_segmentation``):

* **Eq. 1, jointly** (False, the paper configs): minimises ``f_s + f_f`` over everything but
  the SAM image encoder -- tokenizers (with their Eq. 6 terms, which keep encoder outputs and
  codes together under the straight-through gradient), FMP, fused decoder, prompt encoders
  and the semantic decoder. Gradients reach the fusion path through the dense fusion-mask
  prompt and the fusion point prompts; the encoder's input is under stop-gradient
  (``model.train_sam_encoder`` backpropagates through it instead).
* **staged** (True; the official code's way): only the prompts and the decoder train on
  ``f_s``; the fusion path is frozen, so the encoder's input is fixed and its embeddings (and
  the fusion latents) come from the embedding cache.

f_s: cross-entropy (ignore 255) + Dice on the semantic logits.
"""

from __future__ import annotations

import jax

from fusionsam_jax import losses
from fusionsam_jax.data.spec import (eval_every_steps, eval_iterable, stage_batch_size,
                                     stage_steps, train_iterator)
from fusionsam_jax.models import functional as F
from fusionsam_jax.models.fusionsam import FusionSAM, param_layout
from fusionsam_jax.stages import common, embedding_cache
from fusionsam_jax.stages import fusion as fusion_stage

NAME = "segmentation"


def joint(model_cfg) -> bool:
  return not model_cfg.get("freeze_fmp_in_segmentation", False)


def trainable(model_cfg) -> tuple[str, ...]:
  """The prompt encoders' trained parts and the mask decoder (``ParamLayout.head_trainable``);
  jointly (Eq. 1) also the whole fusion path."""
  lay = param_layout(model_cfg)
  if not joint(model_cfg):
    return lay.head_trainable
  return lay.fusion_path + lay.head_trainable


def reads(model_cfg, cached: bool) -> tuple[str, ...]:
  """Prompt encoders and mask decoder; without the cache also the fusion path and the image
  encoder (``ParamLayout.embedding_inputs``)."""
  lay = param_layout(model_cfg)
  return lay.head if cached else lay.head + lay.embedding_inputs


def loss_fn(model: FusionSAM, model_cfg, stage_cfg, fusion_cfg):
  """``(params, batch, rng, step) -> (loss, aux)``. A batch with ``image_embeddings`` and
  ``fusion`` (the cache) skips the fusion path and the encoder."""
  mods = tuple(model_cfg.modalities)
  dice_w = float(stage_cfg.get("dice_weight", 1.0))
  fusion_w = float(stage_cfg.get("fusion_weight", 1.0))
  vq_w = float(stage_cfg.get("vq_weight", 1.0))
  weights = fusion_stage.fusion_weights(fusion_cfg)
  is_joint = joint(model_cfg)

  def fn(params, batch, rng, step):
    aux = {}
    if "image_embeddings" in batch and "fusion" in batch:
      batch = common.with_float32(batch)
      fusion, emb = batch["fusion"], batch["image_embeddings"]
      total = 0.0
    elif is_joint:
      images = F.inputs_from_batch(batch, mods)
      # The fusion path in model.train_dtype (float32 params, outputs and loss terms).
      out = F.fusion_forward(model, params, images, model.train_dtype, with_vq=True)
      fusion = out["fusion"]
      emb = F.image_embeddings(model, params, out["fused"])
      f_f, terms = losses.fusion_loss(out["fused"], [images[m] for m in mods], weights)
      vq_sum = sum(out["vq"].values())
      total = fusion_w * f_f + vq_w * vq_sum
      aux.update({"f_f": f_f, "vq": vq_sum, **{f"fusion/{k}": v for k, v in terms.items()}})
    else:
      fz = F.frozen_fusion(model, params, F.inputs_from_batch(batch, mods))
      fusion = fz["fusion"]
      emb = batch.get("image_embeddings")
      emb = F.image_embeddings(model, params, fz["fused"]) if emb is None else emb
      total = 0.0
    hw = batch["label"].shape[1:3]
    out = model.apply({"params": params}, fusion, emb, hw, method=FusionSAM.segment)
    f_s, terms = losses.segmentation_loss(out["logits"], batch["label"], dice_weight=dice_w)
    aux.update({k: v for k, v in terms.items() if k != "num_valid"})
    aux["f_s"] = f_s
    return total + f_s, aux

  return fn


def make(ctx: common.Context) -> common.Stage:
  """``ctx.evaluator`` (its ``val_metrics(params, batches) -> {"val_miou", ...}``) validates
  the stage (None: no val). ``ctx.use_cache`` None: the config decides
  (`embedding_cache.cache_enabled`)."""
  config, model, spec = ctx.config, ctx.model, ctx.stage_spec()
  evaluator = ctx.evaluator.val_metrics if ctx.evaluator is not None else None
  use_cache = ctx.use_cache
  sc = config.train.stages[NAME]
  if use_cache is None:
    use_cache = embedding_cache.cache_enabled(config)[0] and not joint(config.model)
  num_steps = stage_steps(config, NAME, ctx.train_size)
  lr = common.stage_lr(config, NAME, num_steps)
  tx = common.stage_optimizer(config, NAME, lr)
  key = common.stage_key(config, spec)
  val_split = str(config.eval.val_split)
  state = {"val": None}

  def iterator(params):
    val_source = ctx.spec.source(val_split)
    cache = None
    if use_cache:
      cache = embedding_cache.maybe_build(config, ctx.workdir, model, params, ctx.spec,
                                          ctx.mesh, val_source, progress=ctx.progress,
                                          say=ctx.say)
    if cache is None:
      state["val"] = lambda: eval_iterable(config, val_source)
      return train_iterator(config, ctx.spec, NAME, spec.rng_offset)
    state["val"] = cache.val_batches
    return iter(cache.train_loader(config, NAME, spec.rng_offset))

  def eval_fn(params):
    if state["val"] is None:  # evaluated before training (a resumed, complete stage)
      state["val"] = lambda: eval_iterable(config, ctx.spec.source(val_split))
    return evaluator(params, state["val"]())

  return common.Stage(
      name=NAME, num_steps=num_steps,
      batch_size=stage_batch_size(config, NAME), lr=lr,
      trainable=trainable(config.model), reads=reads(config.model, use_cache),
      init_state=lambda params: common.new_state(params, tx, key),
      train_step=common.make_train_step(
          loss_fn(model, config.model, sc, config.train.stages.fusion), tx, ctx.mesh),
      iterator=iterator, eval_fn=eval_fn if evaluator is not None else None,
      eval_every=eval_every_steps(config, ctx.train_size),
      best_k=int(config.train.best_k),
      notes=("Eq. 1 jointly (f_s + f_f), encoder frozen" if joint(config.model)
             else "staged: fusion path frozen" + (", embedding cache" if use_cache else ""),))
