"""Stage 2: FMP + fused-image decoder with the tokenizers frozen (paper Sec. 3.2.3).

Loss: the SwinFusion-style fusion loss of the fused image against every source (SSIM,
max intensity, max Sobel gradient): Eq. 1's f_f.
"""

from __future__ import annotations

from fusionsam_jax import losses
from fusionsam_jax.data.spec import stage_batch_size, stage_steps, train_iterator
from fusionsam_jax.models import functional as F
from fusionsam_jax.models.fusionsam import param_layout
from fusionsam_jax.stages import common

NAME = "fusion"


def trainable(model_cfg) -> tuple[str, ...]:
  """The fusion module, the patch embeddings (ablation A) and the fused-image decoder
  (``ParamLayout.fusion_trainable``)."""
  return param_layout(model_cfg).fusion_trainable


def fusion_path(model_cfg) -> tuple[str, ...]:
  """Every top-level param upstream of the SAM encoder (``ParamLayout.fusion_path``)."""
  return param_layout(model_cfg).fusion_path


def fusion_weights(stage_cfg):
  w = stage_cfg.get("weights", None)
  return dict(w) if w else None


def loss_fn(model, model_cfg, stage_cfg):
  mods = tuple(model_cfg.modalities)
  weights = fusion_weights(stage_cfg)

  def fn(params, batch, rng, step):
    images = F.inputs_from_batch(batch, mods)
    out = F.fuse(model, params, images)
    return losses.fusion_loss(out["fused"], [images[m] for m in mods], weights)

  return fn


def make(ctx: common.Context) -> common.Stage:
  config, model, spec = ctx.config, ctx.model, ctx.stage_spec()
  sc = config.train.stages[NAME]
  num_steps = stage_steps(config, NAME, ctx.train_size)
  lr = common.stage_lr(config, NAME, num_steps)
  tx = common.stage_optimizer(config, NAME, lr)
  key = common.stage_key(config, spec)
  return common.Stage(
      name=NAME, num_steps=num_steps,
      batch_size=stage_batch_size(config, NAME), lr=lr,
      trainable=trainable(config.model), reads=fusion_path(config.model),
      init_state=lambda params: common.new_state(params, tx, key),
      train_step=common.make_train_step(loss_fn(model, config.model, sc), tx, ctx.mesh),
      iterator=lambda params: train_iterator(config, ctx.spec, NAME, spec.rng_offset))
