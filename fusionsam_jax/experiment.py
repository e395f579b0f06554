"""What the CLIs (train / evaluate / predict) run: data setup, model building, the three
training stages, checkpoint restore and evaluation. Library code: it raises, the CLIs print
and exit.

    from fusionsam_jax import experiment
    experiment.train(config, workdir)                      # all stages, resumable
    result = experiment.evaluate(config, workdir, "best", "test")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax import config_lib
from fusionsam_jax.jit_utils import run_once
from fusionsam_jax import training as T

log = logging.getLogger(__name__)

PyTree = Any

#: Config keys that may change between runs in one workdir (more steps, logging cadence,
#: evaluation settings): the workdir config guard ignores them.
MUTABLE_CONFIG_KEYS = (
    *(f"train.stages.{s}.num_steps" for s in config_lib.STAGE_NAMES),
    "train.log_every", "train.image_every", "train.worker_count", "train.checkpoint_every",
    "train.eval_every", "train.keep_latest", "train.best_k", "eval", "data_dir",
)
STAGE_SEED_OFFSET = {"tokenizer": 1, "fusion": 2, "segmentation": 3}


# --------------------------------------------------------------------------------------------
# Errors (all carry a message a user can act on)
# --------------------------------------------------------------------------------------------


class SetupError(RuntimeError):
  """Something a run needs is missing (dataset, SAM weights, checkpoint, ...)."""


class DataMissingError(SetupError, FileNotFoundError):
  """The prepared dataset is not there."""


class SamWeightsMissingError(SetupError, FileNotFoundError):
  """The converted SAM checkpoint is not there."""


class NoCheckpointError(SetupError, FileNotFoundError):
  """The workdir has no segmentation-stage checkpoint to evaluate / predict with."""


def _primary() -> bool:
  return jax.process_index() == 0


def say(msg: str) -> None:
  """Progress information for the user (process 0, stdout, flushed)."""
  if _primary():
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """name: dataset / layout name; data_dir: root holding ``<name>/<version>`` (prepared);
  generated: a generated scene set (made by this package)."""
  name: str
  data_dir: str
  generated: bool

  def source(self, split: str):
    from fusionsam_jax import data
    return data.load_source(self.name, split, self.data_dir)

  @property
  def dataset_dir(self) -> str:
    from fusionsam_jax.data.prepare import dataset_dir
    return dataset_dir(self.name, self.data_dir)


def _generate_sig(config) -> tuple[str, tuple[int, int]]:
  g = config.generate
  h = g.height if g.height is not None else config.train.crop_size[0]
  w = g.width if g.width is not None else config.train.crop_size[1]
  from fusionsam_jax.data.info import get_info
  name = get_info(config.dataset).name
  return f"{name}-n{g.num}-s{g.seed}-{h}x{w}", (int(h), int(w))


def data_spec(config) -> DataSpec:
  """Where the config's dataset lives (does not check that it exists)."""
  from fusionsam_jax.data.info import get_info
  name = get_info(config.dataset).name
  if config.get("generate") is not None:
    sig, _ = _generate_sig(config)
    return DataSpec(name, os.path.join(os.fspath(config.data_dir), "generated", sig), True)
  return DataSpec(name, os.fspath(config.data_dir), False)


def ensure_data(config, *, progress: bool = True) -> DataSpec:
  """Returns the dataset's `DataSpec`; generates + prepares a generated set when absent.

  Raises `DataMissingError` (naming the prepare command) for a real dataset that has not
  been prepared.
  """
  from fusionsam_jax import data
  from fusionsam_jax.data.prepare import is_prepared
  spec = data_spec(config)
  if is_prepared(spec.name, spec.data_dir):
    return spec
  if not spec.generated:
    info = data.get_info(spec.name)
    raise DataMissingError(
        f"dataset '{spec.name}' is not prepared under data_dir={spec.data_dir!r} "
        f"(expected {spec.dataset_dir}/dataset_info.json). Get {info.source}, then run\n"
        f"  python -m fusionsam_jax.data.prepare --dataset {spec.name} "
        f"--manual-dir PATH/TO/{spec.name.upper()} --data-dir {spec.data_dir}\n"
        f"or point --config.data_dir at the folder you prepared it in.")
  sig, (h, w) = _generate_sig(config)
  raw = os.path.join(spec.data_dir, "raw")
  g = config.generate
  t0 = time.perf_counter()
  if _primary():
    say(f"Generating {g.num} {spec.name}-layout scenes ({h}x{w}, seed {g.seed}) in {raw}")
    data.generate_dataset(spec.name, raw, int(g.num), int(g.seed), h, w, overwrite=True,
                          progress=False)
    data.prepare_dataset(spec.name, raw, spec.data_dir, if_exists="overwrite",
                         progress=False)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fusionsam_generate")
  say(f"Prepared the generated set at {spec.dataset_dir} ({time.perf_counter() - t0:.1f} s)")
  return spec


def strip_batch(batch: Mapping[str, Any]) -> dict:
  """The numeric part of a loader batch (drops ``name``), ready for `shard_batch`."""
  return {k: v for k, v in batch.items() if k != "name"}


def stage_batch_size(config, stage: str) -> int:
  """Global batch of a stage: ``train.stages.<stage>.batch_size`` if set, else
  ``train.batch_size``."""
  b = config.train.stages[stage].get("batch_size")
  return int(b if b else config.train.batch_size)


def stage_crop_size(config, stage: str) -> tuple[int, int]:
  """Training crop of a stage: ``train.stages.<stage>.crop_size`` if set, else
  ``train.crop_size`` (the tokenizer is fully convolutional and may train on smaller crops)."""
  c = config.train.stages[stage].get("crop_size")
  return tuple(int(x) for x in (c if c else config.train.crop_size))


def train_iterator(config, spec: DataSpec, stage: str):
  from fusionsam_jax import data
  per_process = stage_batch_size(config, stage) // jax.process_count()
  loader = data.train_loader(
      spec.source("train"), batch_size=per_process, crop_size=stage_crop_size(config, stage),
      scale_range=tuple(config.train.scale_range), flip_prob=float(config.train.flip_prob),
      seed=int(config.seed) + STAGE_SEED_OFFSET[stage], worker_count=int(config.train.worker_count),
      modalities=tuple(config.model.modalities))
  return iter(loader)


def eval_iterable(config, source, *, batch_size: int | None = None):
  """A fresh eval loader over `source` (full resolution, padding, ``valid`` masks)."""
  from fusionsam_jax import data
  bs = int(batch_size or config.eval.batch_size)
  per_process = max(1, bs // jax.process_count())
  return data.eval_loader(source, batch_size=per_process,
                          pad_multiple=int(config.eval.pad_multiple),
                          modalities=tuple(config.model.modalities))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def check_sam_weights(config) -> str | None:
  """Returns the converted SAM checkpoint dir (None: random init allowed by the config)."""
  m = config.model
  path = m.sam_checkpoint
  if not path:
    if not m.allow_random_sam:
      raise SamWeightsMissingError(
          "model.sam_checkpoint is not set and model.allow_random_sam is False. Convert the "
          f"official {m.sam_variant} weights once:\n  python tools/convert_sam_weights.py "
          f"--checkpoint sam_{m.sam_variant}_XXXX.pth --output ckpt/sam_{m.sam_variant}\n"
          f"and pass --config.model.sam_checkpoint=ckpt/sam_{m.sam_variant}")
    return None
  from fusionsam_jax.sam_checkpoint import META_FILE
  if not os.path.isfile(os.path.join(path, META_FILE)):
    what = "does not exist" if not os.path.exists(path) else f"has no {META_FILE}"
    raise SamWeightsMissingError(
        f"converted SAM weights {path!r} {what}. Download the official checkpoint "
        f"(https://github.com/facebookresearch/segment-anything#model-checkpoints, "
        f"sam_vit_h_4b8939.pth for vit_h) and convert it once:\n"
        f"  python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth "
        f"--output {path}")
  return path


def sam_config(config):
  """The SAM size: the preset ``model.sam_variant``, with ``model.sam_overrides`` (if any)
  applied. Overrides give a different architecture, so they are refused together with
  converted SAM weights."""
  from fusionsam_jax.models.sam.sam import SAM_PRESETS
  m = config.model
  if m.sam_variant not in SAM_PRESETS:
    raise ValueError(f"model.sam_variant {m.sam_variant!r}: expected one of {sorted(SAM_PRESETS)}")
  cfg = SAM_PRESETS[m.sam_variant]
  overrides = dict(m.get("sam_overrides") or {})
  if overrides:
    if m.sam_checkpoint:
      raise ValueError(f"model.sam_overrides {overrides} change SAM's architecture; they "
                       "cannot be combined with converted SAM weights (model.sam_checkpoint)")
    unknown = sorted(set(overrides) - set(cfg.to_dict()))
    if unknown:
      raise ValueError(f"model.sam_overrides: unknown SamConfig field(s) {unknown}")
    cfg = type(cfg).from_dict({**cfg.to_dict(), **overrides})
  return cfg


def build_model(config):
  from fusionsam_jax.models import fusionsam
  return fusionsam.build_model(config.model, sam_config=sam_config(config))


def init_params(config, model, *, load_sam: bool = True) -> PyTree:
  """Random init of the whole tree, then the converted SAM weights (when configured)."""
  from fusionsam_jax.models import fusionsam
  rng = jax.random.PRNGKey(int(config.seed))
  hw = tuple(config.train.crop_size)
  path = check_sam_weights(config) if load_sam else None
  # With SAM weights to load, the encoder's random values would be thrown away: shapes only.
  params = fusionsam.init_params(model, rng, hw,
                                 image_encoder="random" if path is None else "abstract")
  if path is not None:
    params = fusionsam.load_sam_weights(params, path, config.model)
  return params


def abstract_params(config, model) -> PyTree:
  from fusionsam_jax.models import fusionsam
  return jax.eval_shape(lambda: fusionsam.init_params(model, jax.random.PRNGKey(0),
                                                      tuple(config.train.crop_size)))


def stage_optimizer(config, stage: str, params: PyTree):
  """(trainable mask, optax optimizer) of a stage over the full param tree."""
  from fusionsam_jax import stages
  sc = config.train.stages[stage]
  mask = T.trainable_mask(params, list(stages.trainable(stage, config.model)))
  clip = float(config.train.get("grad_clip", 0.0) or 0.0) or None
  tx = T.make_optimizer(float(sc.lr), float(sc.weight_decay), mask, clip=clip)
  return mask, tx


def perceptual_loss(config):
  """`vgg.PerceptualLoss` from ``config.perceptual_weights``; without it the SAM encoder's
  early blocks (`sam_perceptual.SamPerceptualLoss`) when the run has converted SAM weights;
  else None (a random SAM: loss off, said once)."""
  path = config.get("perceptual_weights")
  sam_ckpt = config.model.get("sam_checkpoint")
  if not path and sam_ckpt:
    # No VGG16: Phi = the frozen SAM encoder's early blocks (models/sam_perceptual.py).
    from fusionsam_jax.models.sam_perceptual import SamPerceptualLoss
    if not os.path.isdir(sam_ckpt):
      raise SamWeightsMissingError(f"SAM checkpoint {sam_ckpt} does not exist")
    blocks = int(config.get("perceptual_sam_blocks", 2) or 2)
    say(f"Perceptual loss (Eq. 7): features of the frozen SAM encoder's first {blocks} "
        f"blocks ({sam_ckpt}); no VGG16 weights given")
    return SamPerceptualLoss.from_checkpoint(
        sam_ckpt, num_blocks=blocks, dtype=jnp.dtype(config.model.encoder_dtype),
        attn_impl=config.model.attn_impl)
  if not path:
    say("Perceptual loss (Eq. 7) is OFF: no VGG16 weights given. To enable it, convert "
        "torchvision's VGG16 once (python tools/convert_vgg16.py --weights vgg16.pth --output "
        "ckpt/vgg16.npz) and pass --config.perceptual_weights=ckpt/vgg16.npz")
    return None
  if not os.path.isfile(path):
    raise SetupError(f"perceptual_weights {path!r} does not exist; convert VGG16 with "
                     f"python tools/convert_vgg16.py --weights vgg16.pth --output {path}, or "
                     "set --config.perceptual_weights='' to train without the perceptual loss")
  from fusionsam_jax.models import vgg
  return vgg.PerceptualLoss.from_file(path)


# --------------------------------------------------------------------------------------------
# Evaluation pieces shared by training (val) and evaluate (test)
# --------------------------------------------------------------------------------------------


def make_eval_step(model, config, mesh):
  """jitted ``(params, batch) -> {"cm": (K, K) int32, "prob": (B, H, W) salient prob,
  "pred", "fused"}`` on the mesh (batch sharded)."""
  from fusionsam_jax import stages
  from fusionsam_jax.metrics.miou import confusion_matrix
  predict = stages.predict_fn(model)
  k = int(config.model.num_classes)
  saliency = config.model.task == "saliency"

  def step(params, batch):
    out = predict(params, batch)
    cm = confusion_matrix(out["pred"], batch["label"], k, 255, valid=batch["valid"])
    res = {"cm": cm, "pred": out["pred"], "fused": out["fused"]}
    if saliency:
      res["prob"] = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)[..., 1]
    return res

  repl, data = T.replicated(mesh), T.data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=repl)


def _host_local(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def run_eval(eval_step, params, batches, *, num_classes: int, saliency: bool, mesh,
             max_batches: int | None = None, on_batch: Callable | None = None) -> dict:
  """Accumulates one confusion matrix (and SOD metrics) over `batches`."""
  from fusionsam_jax.metrics.miou import ConfusionMatrix
  cm = ConfusionMatrix(num_classes, ignore_index=255)
  sod = None
  if saliency:
    from fusionsam_jax.metrics.sod import SODMetrics
    sod = SODMetrics()
  n_images = 0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    local = strip_batch(batch)
    out = eval_step(params, T.shard_batch(local, mesh))
    cm.add(_host_local(out["cm"]))
    valid = np.asarray(local["valid"])
    n_images += int(valid.reshape(valid.shape[0], -1).any(1).sum())
    if sod is not None or on_batch is not None:
      host = {k: _host_local(v) for k, v in out.items() if k != "cm"}
      if sod is not None:
        probs, labels = host["prob"], np.asarray(local["label"])
        for j in range(valid.shape[0]):
          rows, cols = valid[j].any(1).sum(), valid[j].any(0).sum()
          if rows == 0:
            continue
          # As the field does: the map is saved as an 8-bit PNG, then evaluated.
          pm = np.round(np.clip(probs[j, :rows, :cols], 0, 1) * 255).astype(np.uint8)
          gt = (labels[j, :rows, :cols] == 1).astype(np.uint8) * 255
          sod.update(pm, gt)
      if on_batch is not None:
        on_batch(batch, host)
  out = {"cm": cm, "num_images": n_images}
  if sod is not None:
    out["sod"] = sod.results(curves=False) if sod.count else {}
  return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  stages: dict                       # stage -> {"skipped", "steps", "seconds", "last_eval"}
  evaluation: dict | None            # `evaluate` result on config.eval.split (or None)
  seconds: float


def stage_checkpointer(config, workdir: str, stage: str, fingerprint: str | None = None,
                       ) -> T.StageCheckpointer:
  t = config.train
  return T.StageCheckpointer(
      os.path.join(workdir, "checkpoints", stage), save_interval_steps=int(t.checkpoint_every),
      keep_latest=int(t.keep_latest), best_k=int(t.best_k) if stage == "segmentation" else 0,
      best_metric="val_miou", stage=stage, config_fingerprint=fingerprint)


def _image_fn(config, model, mesh, batch):
  """TensorBoard images: inputs | fused | prediction | ground truth, per example."""
  from fusionsam_jax import stages
  from fusionsam_jax.data.info import get_info
  info = get_info(config.dataset)
  predict = jax.jit(stages.predict_fn(model))
  local = {k: np.asarray(v)[:2] for k, v in strip_batch(batch).items()}

  def fn(state, step):
    params = state.params
    if isinstance(params, Mapping) and "generator" in params:   # the tokenizer stage
      params = params["generator"]
    out = jax.device_get(predict(params, local))
    tiles = []
    for m in config.model.modalities:
      x = local[m]
      tiles.append(np.repeat(x, 3, -1) if x.shape[-1] == 1 else x)
    tiles.append(np.round(np.clip(np.asarray(out["fused"]), 0, 1) * 255).astype(np.uint8))
    tiles.append(info.colorize(np.asarray(out["pred"])) if config.model.task == "semantic"
                 else np.repeat((np.asarray(out["pred"])[..., None] * 255).astype(np.uint8), 3, -1))
    tiles.append(info.colorize(np.where(local["label"] == 255, 0, local["label"])))
    return {"inputs|fused|pred|truth": np.concatenate(tiles, axis=2)}
  return fn


def _is_abstract(tree) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _new_state(make: Callable, params):
  """`make(params)`, or its shapes when `params` are only shapes (a template to restore)."""
  return jax.eval_shape(make, params) if _is_abstract(params) else make(params)


def train(config, workdir: str, *, allow_config_change: bool = False,
          progress: bool = True, loss_hook: Callable | None = None) -> TrainResult:
  """Runs every stage (each resumable, skipped when complete), then evaluates on the test
  split when ``config.eval.after_training``.

  `loss_hook(stage, loss_fn) -> loss_fn` (instrumentation, e.g. tests that inject a NaN)
  wraps the fusion and segmentation losses.
  """
  hook = loss_hook or (lambda stage, fn: fn)
  from fusionsam_jax import stages as S
  from fusionsam_jax import embedding_cache as EC

  t_start = time.perf_counter()
  T.maybe_initialize_distributed()
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  fp = T.check_workdir_config(workdir, config, ignore=MUTABLE_CONFIG_KEYS,
                              allow_change=allow_config_change)
  mesh = T.make_mesh()
  sizes = [stage_batch_size(config, s) for s in config_lib.STAGE_NAMES] + [
      int(config.eval.batch_size)]
  for n in sizes:
    T.check_global_batch(n, mesh)
    if n % jax.process_count():
      raise ValueError(f"batch size {n} is not divisible by the {jax.process_count()} processes")

  spec = ensure_data(config, progress=progress)
  m = config.model
  if not m.sam_checkpoint:
    say(f"NOTE: SAM is a randomly initialised '{m.sam_variant}' model (model.allow_random_sam):"
        " the official SAM weights cannot be downloaded here, so the frozen image encoder "
        "gives random features. Results say nothing about FusionSAM with real SAM weights.")
  model = build_model(config)
  first = next((st for st in S.STAGES if S.trainable(st, m)
                and int(config.train.stages[st].num_steps) > 0), None)
  if first is not None and os.path.exists(os.path.join(
      workdir, "checkpoints", first, "STAGE_DONE.json")):
    # Resuming after the first stage: every param comes from checkpoints, so the initial
    # values (and the SAM weights) are not needed, only their shapes.
    params = abstract_params(config, model)
  else:
    params = init_params(config, model)
  say(f"Model: {T.count_params(params) / 1e6:.2f} M parameters; modalities "
      f"{tuple(m.modalities)}; SAM {m.sam_variant} ({m.encoder_dtype}, {m.attn_impl}); "
      f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}")

  val_source = spec.source(config.eval.val_split)
  first_val = (next(iter(eval_iterable(config, val_source)))
               if int(config.train.image_every) > 0 else None)
  eval_step = make_eval_step(model, config, mesh)
  results: dict[str, dict] = {}
  for stage in S.STAGES:
    sc = config.train.stages[stage]
    n_steps = int(sc.num_steps)
    t0 = time.perf_counter()
    if not S.trainable(stage, m) or n_steps <= 0:
      why = ("nothing to train" if not S.trainable(stage, m) else "num_steps is 0")
      say(f"== stage '{stage}': {why}; skipped")
      results[stage] = {"skipped": True, "steps": 0, "seconds": 0.0, "last_eval": {}}
      continue
    ckpt = stage_checkpointer(config, workdir, stage, fp)
    with ckpt:
      done = ckpt.is_stage_done()
      mask, tx = stage_optimizer(config, stage, params)
      if not done:
        say(f"== stage '{stage}': {n_steps} steps, lr {sc.lr}, trains "
            f"{T.count_params(params, mask) / 1e6:.3f} M of "
            f"{T.count_params(params) / 1e6:.2f} M params ({', '.join(S.trainable(stage, m))})")
      rng = jax.random.PRNGKey(int(config.seed) * 1000 + STAGE_SEED_OFFSET[stage])
      common = dict(name=stage, num_steps=n_steps, mesh=mesh, checkpointer=ckpt,
                    workdir=workdir, log_every=int(config.train.log_every),
                    learning_rate=float(sc.lr), progress=progress,
                    image_every=int(config.train.image_every),
                    shard_fn=lambda b: T.shard_batch(strip_batch(b), mesh))
      image_fn = _image_fn(config, model, mesh, first_val) if int(
          config.train.image_every) > 0 and not done else None

      if stage == "tokenizer":
        from fusionsam_jax.models import fusionsam
        hw = stage_crop_size(config, stage)
        from fusionsam_jax import losses as L
        d_start = L.disc_start_step(sc.get("disc_start"), sc.num_steps,
                                    float(sc.get("disc_start_fraction", 0.5)),
                                    float(sc.get("disc_weight", 0.8)))
        d_tx = T.make_optimizer(L.disc_lr_schedule(float(sc.lr), d_start),
                                float(sc.weight_decay))
        g_loss, d_loss = S.tokenizer_losses(model, m, sc, perceptual=None if done
                                            else perceptual_loss(config))

        def gan_state(p, disc, d_tx=d_tx, tx=tx, rng=rng):
          return T.init_gan_state({"generator": p, "discriminator": disc}, tx, d_tx, rng)
        if done:  # only a template for restoring the final checkpoint
          state = jax.eval_shape(lambda p: gan_state(
              p, fusionsam.init_discriminators(m, jax.random.PRNGKey(0), hw)), params)
        else:
          state = gan_state(params, run_once(
              lambda r: fusionsam.init_discriminators(m, r, hw), jax.random.fold_in(rng, 7)))
        step_fn = T.make_gan_train_step(g_loss, d_loss, tx, d_tx, mesh,
                                        g_post_update=S.codebook_restart_fn(model, m, sc))
        it = None if done else train_iterator(config, spec, stage)
        res = T.run_stage(state=state, train_step=step_fn, data_iter=it or iter(()),
                          image_fn=image_fn, **common)
        params = res.state.params["generator"]
      elif stage == "fusion":
        loss_fn = hook(stage, S.fusion_loss_fn(model, m, sc))
        state = _new_state(lambda p: T.TrainState.create(p, tx, rng), params)
        step_fn = T.make_train_step(loss_fn, tx, mesh, trainable=mask, pass_step=True)
        it = None if done else train_iterator(config, spec, stage)
        res = T.run_stage(state=state, train_step=step_fn, data_iter=it or iter(()),
                          image_fn=image_fn, **common)
        params = res.state.params
      else:
        loss_fn = hook(stage, S.segmentation_loss_fn(model, m, sc))
        val_batches = lambda: eval_iterable(config, val_source)  # noqa: E731
        it = None
        cache = None
        if not done:
          cache = EC.maybe_build(config, workdir, model, params, spec, mesh, val_source,
                                 progress=progress)
          if cache is not None:
            it = iter(cache.train_loader(config))
            val_batches = cache.val_batches  # noqa: E731
            loss_fn = EC.with_embeddings(loss_fn)
          else:
            it = train_iterator(config, spec, stage)

        def eval_fn(state):
          r = run_eval(eval_step, state.params, val_batches(),
                       num_classes=int(m.num_classes), saliency=False, mesh=mesh)
          cm = r["cm"]
          return {"val_miou": cm.miou(), "val_pixel_acc": cm.pixel_accuracy()}

        state = _new_state(lambda p: T.TrainState.create(p, tx, rng), params)
        step_fn = T.make_train_step(loss_fn, tx, mesh, trainable=mask, pass_step=True)
        res = T.run_stage(state=state, train_step=step_fn, data_iter=it or iter(()),
                          eval_fn=eval_fn, eval_every=int(config.train.eval_every),
                          image_fn=image_fn, **common)
        params = res.state.params
    dt = time.perf_counter() - t0
    results[stage] = {"skipped": res.skipped, "steps": n_steps, "seconds": dt,
                      "last_eval": res.last_eval}
    if res.skipped:
      say(f"== stage '{stage}' already complete ({res.restored_step} steps); skipped")
    else:
      extra = f"; val {res.last_eval}" if res.last_eval else ""
      say(f"== stage '{stage}' done in {dt:.1f} s{extra}")
  del params

  evaluation = None
  if config.eval.get("after_training", False):
    evaluation = evaluate(config, workdir, "best", config.eval.split, mesh=mesh, model=model,
                          eval_step=eval_step)
  return TrainResult(results, evaluation, time.perf_counter() - t_start)


# --------------------------------------------------------------------------------------------
# Restore + evaluate
# --------------------------------------------------------------------------------------------


def parse_checkpoint_arg(value: str | int) -> str | int:
  if isinstance(value, int):
    return value
  v = str(value).strip()
  if v in ("best", "latest"):
    return v
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"--checkpoint {value!r}: expected best, latest or a step number") from None


def restore_params(config, workdir: str, which: str | int = "best", *, model=None,
                   mesh=None) -> tuple[PyTree, int, str]:
  """Restores the segmentation stage's params. Returns (params, step, what) where `what`
  says which checkpoint was used ("best", "latest" or "step N")."""
  workdir = os.fspath(workdir)
  directory = os.path.join(workdir, "checkpoints", "segmentation")
  steps = []
  if os.path.isdir(directory):
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  if not steps:
    raise NoCheckpointError(
        f"no segmentation-stage checkpoint in {directory}: train first with\n"
        f"  python -m fusionsam_jax.train --config CONFIG --workdir {workdir}")
  model = model or build_model(config)
  mesh = mesh or T.make_mesh()
  abstract = abstract_params(config, model)
  _, tx = stage_optimizer(config, "segmentation", abstract)
  template = jax.eval_shape(lambda p: T.TrainState.create(p, tx, 0), abstract)
  with stage_checkpointer(config, workdir, "segmentation") as ckpt:
    what = which
    if which == "best" and ckpt.best_step() is None:
      log.warning("no checkpoint has a val_miou; using the latest")
      what = "latest"
    try:
      restored = ckpt.restore(template, what, mesh=mesh)
    except T.CheckpointRestoreError as e:
      raise NoCheckpointError(str(e)) from None
  if restored is None:
    raise NoCheckpointError(f"no usable checkpoint in {directory}")
  label = what if isinstance(what, str) else f"step {what}"
  return restored.state.params, restored.step, label


def load_workdir_config(workdir: str):
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.isfile(path):
    raise SetupError(f"{path} does not exist: {workdir} is not a training workdir "
                     "(python -m fusionsam_jax.train --config ... --workdir ...)")
  with open(path) as f:
    record = json.load(f)
  return config_lib.config_from_dict(record["config"])


def check_config_matches(config, workdir: str) -> None:
  """Raises `ConfigMismatchError` if `config` differs from the workdir's stored config."""
  from fusionsam_jax.training.guards import config_fingerprint
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    stored = json.load(f)["config"]
  if config_fingerprint(stored, MUTABLE_CONFIG_KEYS) != config_fingerprint(
      config, MUTABLE_CONFIG_KEYS):
    from fusionsam_jax.training.guards import _drop, _flatten, config_to_dict
    a = _drop(_flatten(stored), MUTABLE_CONFIG_KEYS)
    b = _drop(_flatten(config_to_dict(config)), MUTABLE_CONFIG_KEYS)
    diff = [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    raise T.ConfigMismatchError(
        f"workdir {workdir} was trained with a different config ({path}): "
        + "; ".join(diff[:20]) + ". Pass the config it was trained with (or none: the "
        "stored one is used).")


def evaluate(config, workdir: str, which: str | int = "best", split: str = "test", *,
             mesh=None, model=None, eval_step=None, print_table: bool = True) -> dict:
  """Evaluates a segmentation checkpoint on `split` at full resolution; prints the IoU table
  (and SOD metrics for saliency) and writes ``workdir/eval_<split>_<which>.json``."""
  from fusionsam_jax.data.info import get_info
  from fusionsam_jax.metrics.miou import format_iou_table, write_json_atomic
  workdir = os.fspath(workdir)
  mesh = mesh or T.make_mesh()
  model = model or build_model(config)
  params, step, what = restore_params(config, workdir, which, model=model, mesh=mesh)
  spec = ensure_data(config)
  info = get_info(spec.name)
  source = spec.source(split)
  t0 = time.perf_counter()
  eval_step = eval_step or make_eval_step(model, config, mesh)
  saliency = config.model.task == "saliency"
  r = run_eval(eval_step, params, eval_iterable(config, source),
               num_classes=int(config.model.num_classes), saliency=saliency, mesh=mesh)
  cm = r["cm"]
  names = list(info.class_names)
  summary = cm.summary(names)
  summary.update(split=split, checkpoint=what, step=int(step), num_images=r["num_images"],
                 dataset=spec.name, generated=spec.generated,
                 modalities=list(config.model.modalities), seconds=time.perf_counter() - t0)
  if saliency:
    summary["sod"] = {k: float(v) for k, v in r["sod"].items()}
  tag = what if isinstance(which, str) else str(which)
  path = os.path.join(workdir, f"eval_{split}_{tag}.json")
  if _primary():
    write_json_atomic(summary, path)
  if print_table:
    label = f"FusionSAM ({'+'.join(config.model.modalities)})"
    say(f"\n{spec.name} {split} split, {r['num_images']} images, checkpoint {what} "
        f"(step {step}):")
    say(format_iou_table(cm.iou(), names, miou=cm.miou(), method=label))
    say(f"pixel accuracy {cm.pixel_accuracy() * 100:.2f}%")
    if saliency and summary.get("sod"):
      s = summary["sod"]
      say("S-measure {Sm:.4f}  MAE {MAE:.4f}  E-measure adp/mean/max {adpEm:.4f}/{meanEm:.4f}/"
          "{maxEm:.4f}  F-measure adp/mean/max {adpFm:.4f}/{meanFm:.4f}/{maxFm:.4f}".format(**s))
    say(f"wrote {path}")
  summary["path"] = path
  return summary
