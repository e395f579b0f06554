"""What the CLIs run: train every stage (resumable), restore a run's params, evaluate.

    from fusionsam_jax import config_lib
from fusionsam_jax import experiment
    experiment.train(config, workdir)                       # all stages, resumable
    params, step, what = experiment.restore_params(config, workdir, "best")
    result = experiment.evaluate(config, workdir, "best", "test")

A run's params are composed, never stored whole: the converted SAM weights (recorded by
sha256 in the workdir) + the seeded random init + each stage's trained params, later stages
overriding earlier ones (`workdir.py`). Library code: raises; the CLIs print and exit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax

from fusionsam_jax import config_lib
from fusionsam_jax import workdir as W
from fusionsam_jax.data import spec as D
from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.errors import ConfigValueError, NoCheckpointError, SetupError  # noqa: F401
from fusionsam_jax.evaluators import segmentation as E
from fusionsam_jax.fsutil import atomic_write_json
from fusionsam_jax.metrics.miou import format_iou_table
from fusionsam_jax.models import factory
from fusionsam_jax.stages import common, registry
from fusionsam_jax.training import checkpointing, loop, mesh as mesh_lib
from fusionsam_jax.training.guards import ConfigMismatchError
from fusionsam_jax.training.state import count_params

PyTree = Any


def say(msg: str) -> None:
  """Progress for the user (process 0, stdout, flushed)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def context(config, workdir: str | None = None, *, mesh=None, model=None,
            data: bool = True, progress: bool = True) -> common.Context:
  """Everything a stage builder needs. `data`: make sure the dataset is there (a
  generated set is prepared on first use) and count its train split; without it (restoring
  params for prediction) no data is touched and durations are unknown (0)."""
  spec = D.ensure_data(config, say=say) if data else D.data_spec(config)
  return common.Context(config=config, model=model or factory.build_model(config),
                        mesh=mesh or mesh_lib.make_mesh(), spec=spec,
                        train_size=spec.split_size("train") if data else 0, workdir=workdir,
                        say=say, progress=progress)


def build_stage(ctx: common.Context, name: str, **options) -> common.Stage | None:
  """The named stage (`stages.registry`; None: nothing to train). `options` set fields of
  the context for it (``evaluator``: validate the stage where it validates;
  ``perceptual``, ``use_cache``: see `common.Context`)."""
  return registry.build(dataclasses.replace(ctx, **options), name)


def _restore_trained(ckpt, stage: common.Stage, params: PyTree, which, mesh):
  """(trained model params, step) of checkpoint `which` of a stage."""
  restored = ckpt.restore(stage.abstract_state(params), which, mesh=mesh)
  if restored is None:
    raise NoCheckpointError(f"{ckpt.directory} holds no checkpoint")
  return stage.model_params(restored.state), restored.step


@dataclasses.dataclass
class TrainResult:
  stages: dict                       # stage -> {"skipped", "steps", "seconds", "last_eval"}
  evaluation: dict | None            # `evaluate` on config.eval.split (or None)
  seconds: float


def train(config, workdir: str, *, allow_config_change: bool = False, progress: bool = True,
          step_hook: Callable | None = None,
          on_evaluation: Callable | None = None) -> TrainResult:
  """Runs every stage (each resumable, skipped when complete), then evaluates the best
  checkpoint on ``config.eval.split`` when ``config.eval.after_training``.

  The workdir is locked for the run (`workdir.lock`: a second run on it raises
  `locking.DirLockedError` naming the holder); temporary files of killed runs in it are
  removed first. A complete stage whose final checkpoint does not restore has it moved to
  ``checkpoints/<stage>_corrupt`` and resumes from its newest usable checkpoint. The config
  is stored (``config.json``) only once the run has checked what it needs (data, SAM weights,
  the existing checkpoints against a changed config).

  `step_hook(stage_name, train_step) -> train_step` wraps a stage's step (instrumentation,
  e.g. tests that inject a NaN). `on_evaluation(summary, params, model)` is called with the
  final evaluation and the params it evaluated (the CLI draws the report with them)."""
  t_start = time.perf_counter()
  mesh_lib.maybe_initialize_distributed()
  workdir = W.open_workdir(workdir)
  with W.lock(workdir, say=say):
    W.remove_orphans(workdir, say=say)
    return _train_locked(config, workdir, allow_config_change, progress, step_hook, t_start,
                         on_evaluation)


def _check_checkpoints_fit(ctx: common.Context, workdir: str, params: PyTree,
                           evaluator) -> None:
  """Raises `ConfigMismatchError` when a stage's newest checkpoint holds other params (names,
  shapes) than the config's model: a config change that the run cannot continue from."""
  for spec in registry.REGISTRY:
    name = spec.name
    stage = spec.build(dataclasses.replace(ctx, evaluator=evaluator))
    if stage is None:
      continue
    with W.stage_checkpointer(ctx.config, workdir, name, best_k=stage.best_k,
                              read_only=True) as ckpt:
      steps = ckpt.all_steps()
      diff = ckpt.structure_differences(steps[-1], stage.abstract_state(params)) if steps else []
    if diff:
      raise ConfigMismatchError(
          f"the changed config does not fit the checkpoints of stage '{name}' in {workdir} "
          f"(step {steps[-1]}): " + "; ".join(diff[:3])
          + (f" ({len(diff)} differences)" if len(diff) > 3 else "")
          + ". Nothing was changed; use a new workdir for this config")


def _final_checkpoint_usable(ckpt, stage: common.Stage, params: PyTree, mesh) -> bool:
  """Whether a complete stage's final checkpoint restores. If not, it is moved to
  ``<stage>_corrupt`` (said in one line) and the stage is marked incomplete, so that it
  resumes from its newest usable checkpoint (or starts again) and ends where it ended."""
  final = W.final_step(ckpt)
  if final is None or final not in ckpt.all_steps():
    reason = f"its final checkpoint ({final}) is missing"
  else:
    why = ckpt.verify(stage.abstract_state(params), final, mesh=mesh)
    if why is None:
      return True
    ckpt.quarantine([(final, why)])
    reason = f"its final checkpoint {final} is unusable"
  ckpt.unmark_stage_done()
  say(f"== stage '{stage.name}' was complete, but {reason}: it is trained again from its "
      "newest usable checkpoint")
  return False


def _train_locked(config, workdir: str, allow_config_change: bool, progress: bool,
                  step_hook: Callable | None, t_start: float,
                  on_evaluation: Callable | None = None) -> TrainResult:
  registry.check_config(config)
  config_lib.check_values(config)
  final = registry.final().name
  if config.train.stages[final].get("num_steps") == 0 and config.eval.get("after_training"):
    raise ConfigValueError(
        f"--config.train.stages.{final}.num_steps=0: expected at least 1 when the run ends "
        "with its evaluation (eval.after_training): a run's params are restored from the "
        "last stage's checkpoints")
  dataset = D.data_spec(config).name
  classes = get_info(dataset).num_classes
  if int(config.model.num_classes) != classes:
    raise ConfigValueError(
        f"--config.model.num_classes={config.model.num_classes}: the {dataset} dataset has "
        f"{classes} classes (labels >= {config.model.num_classes} would be dropped from the "
        "loss and the scores)")
  fp, config_diff = W.check_config(workdir, config, allow_change=allow_config_change)
  mesh = mesh_lib.make_mesh()
  for st in registry.NAMES:
    mesh_lib.check_global_batch(D.stage_batch_size(config, st), mesh)
    common.stage_lr(config, st, 1)   # raises on an unknown lr_schedule before any work
  mesh_lib.check_global_batch(int(config.eval.batch_size), mesh)
  sam_path = factory.sam_weights_path(config)
  W.record_sam_weights(workdir, sam_path)
  ctx = context(config, workdir, mesh=mesh, progress=progress)
  m = config.model
  backbone = (f"SAM {m.sam_variant}" if factory.backbone(config) == "sam"
              else f"SAM 2 {factory.backbone(config)}")
  if sam_path is None:
    say(f"NOTE: {backbone} is a randomly initialised model (model.allow_random_sam):"
        " the frozen image encoder gives random features; results say nothing about "
        "FusionSAM with real SAM weights.")
  params = factory.init_params(config, ctx.model)
  say(f"Model: {count_params(params) / 1e6:.2f} M parameters; modalities {tuple(m.modalities)};"
      f" {backbone} ({m.encoder_dtype}, {m.attn_impl}); {jax.device_count()} "
      f"device(s): {jax.devices()[0].device_kind}; {ctx.train_size} training pairs; input "
      f"pipeline: {D.worker_count(config)} grain worker(s) on {D.host_cpus()} core(s), "
      f"{D.device_prefetch(config)} batches prefetched to the devices")
  evaluator = E.Evaluator(ctx.model, config, mesh)
  if config_diff:
    _check_checkpoints_fit(ctx, workdir, params, evaluator)
    say(f"NOTE: the config of {workdir} changed (--allow_config_change): "
        + "; ".join(config_diff[:5]) + (" ..." if len(config_diff) > 5 else "")
        + "; the old one is kept as config.<time>.json")
  if config_diff != []:
    W.store_config(workdir, config)
  image_every = int(config.train.image_every)
  first_val = tiles = None
  if image_every > 0:
    first_val = next(iter(D.eval_iterable(config, ctx.spec.source(config.eval.val_split))))
    tiles = E.image_tiles(config, first_val, evaluator)
  results: dict[str, dict] = {}
  for spec in registry.REGISTRY:
    name = spec.name
    t0 = time.perf_counter()
    stage = spec.build(dataclasses.replace(ctx, evaluator=evaluator))
    if stage is None or stage.num_steps <= 0:
      say(f"== stage '{name}': {'nothing to train' if stage is None else 'num_steps is 0'};"
          " skipped")
      results[name] = {"skipped": True, "steps": 0, "seconds": 0.0, "last_eval": {}}
      continue
    with W.stage_checkpointer(config, workdir, name, best_k=stage.best_k,
                              fingerprint=fp, say=say) as ckpt:
      done = ckpt.is_stage_done() and _final_checkpoint_usable(ckpt, stage, params, mesh)
      trained = common.select(params, stage.trainable)
      if done:
        state = stage.abstract_state(params)
        it = iter(())
      else:
        say(f"== stage '{name}': {stage.num_steps} steps (batch {stage.batch_size}), lr "
            f"{common.describe_lr(stage.lr)}, trains {count_params(trained) / 1e6:.3f} M of "
            f"{count_params(params) / 1e6:.2f} M params ({', '.join(stage.trainable)})"
            + "".join(f"; {n}" for n in stage.notes))
        state = stage.init_state(trained)
        it = stage.iterator(params)
      frozen = stage.frozen(params)

      def full(st, stage=stage):
        return common.merge(params, stage.model_params(st))

      step_fn = step_hook(name, stage.train_step) if step_hook else stage.train_step
      # TensorBoard images: the stage's own (`Stage.images`), else the evaluator's tiles.
      images = None
      if first_val is not None:
        images = stage.images(first_val) if stage.images is not None else tiles
      res = loop.run_stage(
          name=name, state=state, train_step=step_fn, data_iter=it, frozen=frozen,
          num_steps=stage.num_steps, mesh=mesh, checkpointer=ckpt, workdir=workdir,
          eval_fn=(lambda st, stage=stage: stage.eval_fn(full(st))) if stage.eval_fn else None,
          eval_every=stage.eval_every, log_every=int(config.train.log_every),
          image_fn=None if images is None else (
              lambda st, step, images=images: images(full(st))),
          image_every=image_every, learning_rate=stage.lr, progress=progress,
          shard_fn=lambda b: mesh_lib.shard_batch(D.strip_batch(b), mesh),
          prefetch=D.device_prefetch(config))
      params = full(res.state)
    dt = time.perf_counter() - t0
    results[name] = {"skipped": res.skipped, "steps": stage.num_steps, "seconds": dt,
                     "last_eval": res.last_eval}
    if res.skipped:
      say(f"== stage '{name}' already complete ({res.restored_step} steps); skipped")
    else:
      extra = f"; val {describe_metrics(res.last_eval)}" if res.last_eval else ""
      say(f"== stage '{name}' done in {dt:.1f} s{extra}")
  evaluation = None
  if config.eval.get("after_training", False):
    # Restored into the trained params: their untrained parts are the seeded init (or the
    # SAM weights) that a fresh `restore_params` would build again (a second init, or
    # loading ViT-H again).
    evaluation = evaluate(config, workdir, "best", config.eval.split, ctx=ctx,
                          evaluator=evaluator, base_params=params, keep_params=True)
    if on_evaluation is not None:
      on_evaluation(evaluation, evaluation.pop("params"), ctx.model)
    evaluation.pop("params", None)
  del params
  return TrainResult(results, evaluation, time.perf_counter() - t_start)


def restore_params(config, workdir: str, which: str | int = "best", *,
                   ctx: common.Context | None = None,
                   base_params: PyTree | None = None) -> tuple[PyTree, int, str]:
  """A trained run's full params: the SAM weights (checked against the workdir's record),
  the seeded init, each stage's final params and checkpoint `which` ("best" by val mIoU,
  "latest" or a step) of the final stage (`stages.registry.final`). Returns (params, step, what).

  `base_params`: this run's params to restore into instead of a new init (the trainer's,
  at its end); their untrained parts must be the seeded init / SAM weights, as in training."""
  workdir = os.fspath(workdir)
  final = registry.final().name
  final_dir = W.stage_dir(workdir, final)
  if not (os.path.isdir(final_dir) and any(d.isdigit() for d in os.listdir(final_dir))):
    raise NoCheckpointError(
        f"no {final}-stage checkpoint in {final_dir}: train first with `python -m "
        f"fusionsam_jax.train --config CONFIG --workdir {workdir}`")
  sam_path = factory.sam_weights_path(config)
  W.check_sam_weights(workdir, sam_path)
  ctx = ctx or context(config, workdir, data=False, progress=False)
  params = (factory.init_params(config, ctx.model) if base_params is None
            else base_params)
  step, what = 0, which
  # Only the params are restored: no feature network, no validation.
  rctx = dataclasses.replace(ctx, perceptual=False, evaluator=None)
  for spec in registry.REGISTRY:
    name = spec.name
    stage = spec.build(rctx)
    if stage is None:
      continue
    last = name == final
    with W.stage_checkpointer(config, workdir, name, best_k=stage.best_k,
                              read_only=True) as ckpt:
      if not last and not ckpt.all_steps():
        sc = config.train.stages[name]
        if sc.get("num_steps") == 0 or (sc.get("num_steps") is None
                                        and float(sc.get("num_epochs", 0) or 0) == 0):
          continue  # configured with 0 steps: its params are the initial ones
        raise NoCheckpointError(
            f"stage '{name}' has no checkpoint in {ckpt.directory}: a run's params are "
            "composed from every stage's checkpoint; re-run train")
      if not last and not ckpt.is_stage_done():
        raise NoCheckpointError(f"stage '{name}' of {workdir} is not complete; re-run train")
      what = which if last else W.final_step(ckpt)
      if last and which == "best" and ckpt.best_step() is None:
        say("note: no checkpoint has a val_miou; using the latest")
        what = "latest"
      try:
        trained, step = _restore_trained(ckpt, stage, params, what, ctx.mesh)
      except checkpointing.CheckpointRestoreError as e:
        hint = "" if last or isinstance(e, checkpointing.CheckpointMismatchError) else (
            "; re-run train: it moves the unusable checkpoint aside and trains that stage "
            "again")
        raise NoCheckpointError(f"{e}{hint}") from None
    params = common.merge(params, trained)
  label = what if isinstance(what, str) else f"step {what}"
  return params, step, label


def evaluate(config, workdir: str, which: str | int = "best", split: str = "test", *,
             ctx: common.Context | None = None, evaluator: E.Evaluator | None = None,
             print_table: bool = True, base_params: PyTree | None = None,
             keep_params: bool = False) -> dict:
  """Evaluates a run at full resolution on `split`; prints the IoU table (and SOD metrics
  for saliency), writes ``workdir/eval_<split>_<which>.json``. `base_params`: see
  `restore_params`; `keep_params`: the evaluated params go into the result (``params``)."""
  workdir = os.fspath(workdir)
  ctx = ctx or context(config, workdir, progress=False)
  params, step, what = restore_params(config, workdir, which, ctx=ctx,
                                      base_params=base_params)
  info = get_info(ctx.spec.name)
  evaluator = evaluator or E.Evaluator(ctx.model, config, ctx.mesh)
  t0 = time.perf_counter()
  source = ctx.spec.source(split)
  r = evaluator.run(params, D.eval_iterable(config, source),
                    progress=f"evaluate {split}" if print_table and ctx.progress else None,
                    total=D.num_eval_batches(config, len(source)))
  summary = E.summary(r, info.class_names, split=split, checkpoint=what, step=int(step),
                      dataset=ctx.spec.name, generated=ctx.spec.generated,
                      modalities=list(config.model.modalities),
                      seconds=time.perf_counter() - t0)
  tag = what if isinstance(which, str) else str(which)
  path = os.path.join(workdir, f"eval_{split}_{tag}.json")
  if jax.process_index() == 0:
    atomic_write_json(summary, path)
  if print_table:
    cm = r["cm"]
    say(f"\n{ctx.spec.name} {split} split, {r['num_images']} images, checkpoint {what} "
        f"(step {step}):")
    say(format_iou_table(cm.iou(), list(info.class_names), miou=cm.miou(),
                         method=f"FusionSAM ({'+'.join(config.model.modalities)})"))
    macc = summary.get("mean_class_accuracy")
    say(f"pixel accuracy {cm.pixel_accuracy() * 100:.2f}%, mean class accuracy (mAcc) "
        + ("-" if macc is None else f"{macc * 100:.2f}%"))
    if summary.get("sod"):
      say("S-measure {Sm:.4f}  MAE {MAE:.4f}  E-measure adp/mean/max {adpEm:.4f}/{meanEm:.4f}/"
          "{maxEm:.4f}  F-measure adp/mean/max {adpFm:.4f}/{meanFm:.4f}/{maxFm:.4f}".format(
              **summary["sod"]))
    say(f"wrote {path}")
  summary["path"] = path
  if keep_params:
    summary["params"] = params
  return summary


def describe_metrics(metrics) -> str:
  """``{"val_miou": 0.7611, "pixel_acc": 0.93}`` -> ``mIoU 76.11%, pixel_acc 0.93``."""
  parts = []
  for k, v in metrics.items():
    if k.endswith("miou"):
      parts.insert(0, f"mIoU {float(v) * 100:.2f}%")
    elif isinstance(v, (int, float)):
      parts.append(f"{k.removeprefix('val_')} {float(v):.4g}")
  return ", ".join(parts)
