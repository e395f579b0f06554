"""Generic train steps and the resumable stage loop.

The train step is `jax.jit` over the mesh: state replicated, batch sharded along
``"data"``, the state argument donated. A loss function has the signature
``loss_fn(params, batch, rng) -> (loss, aux_metrics_dict)`` and sees the *global* batch
(jit semantics), so the same code gives the same numbers on 1 or N devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionsam_jax.training import guards
from fusionsam_jax.training import mesh as mesh_lib
from fusionsam_jax.training.checkpointing import StageCheckpointer
from fusionsam_jax.training.logging import MetricWriter
from fusionsam_jax.training.state import TrainState, learning_rate_at

log = logging.getLogger(__name__)

PyTree = Any
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


class _Splitter:
  """Splits a params tree by a bool mask of its structure into (trainable, frozen) trees,
  each with None where the other has a leaf, and merges them back. Flat list work on a
  cached treedef (per-leaf Python `tree.map`s over the ViT-H tree cost ~10 ms of host time
  per step)."""

  def __init__(self, mask: PyTree):
    self.treedef = jax.tree.structure(mask)
    self.keep = [bool(m) for m in self.treedef.flatten_up_to(mask)]

  def split(self, params: PyTree, reads: list[bool] | None = None) -> tuple[PyTree, PyTree]:
    """`reads` (one bool per leaf): frozen leaves marked False are left out (None) too."""
    flat = self.treedef.flatten_up_to(params)
    reads = reads or [True] * len(flat)
    un = self.treedef.unflatten
    return (un([x if k else None for x, k in zip(flat, self.keep)]),
            un([None if k or not r else x for x, k, r in zip(flat, self.keep, reads)]))

  def merge(self, trainable: PyTree, frozen: PyTree) -> PyTree:
    t, f = self.treedef.flatten_up_to(trainable), self.treedef.flatten_up_to(frozen)
    return self.treedef.unflatten([a if k else b for a, b, k in zip(t, f, self.keep)])

  def reads(self, loss: Callable[[PyTree], Any], params: PyTree) -> list[bool]:
    """Which leaves of `params` the traced `loss(params)` reads (one bool per leaf)."""
    flat = self.treedef.flatten_up_to(params)
    abstract = self.treedef.unflatten([jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                                       for x in flat])
    closed = jax.make_jaxpr(loss)(abstract)
    jaxpr = closed.jaxpr
    read = {id(v) for e in jaxpr.eqns for v in e.invars} | {id(v) for v in jaxpr.outvars}
    return [id(v) in read for v in jaxpr.invars[:len(flat)]]



def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, trainable: PyTree | None = None,
                    pass_step: bool = False, donate: bool = True):
  """A ``(state, batch) -> (state, metrics)`` train step, jitted over the mesh.

  Args:
    loss_fn: ``(params, batch, rng) -> (loss, aux)``, or with `pass_step`
      ``(params, batch, rng, step)``; `aux` is a dict of scalar metrics (loss terms).
      `rng` is ``fold_in(state.rng, state.step)``, so a resumed run draws the same keys.
    optimizer: e.g. `make_optimizer(...)`.
    mesh: from `make_mesh()`.
    trainable: bool mask over params (`trainable_mask`). Only the trainable leaves go
      through the jitted update (differentiated, updated, donated); frozen leaves enter it
      as read-only inputs under `stop_gradient` and come back as the very same arrays
      (bitwise unchanged). Frozen leaves the loss does not read (the SAM encoder when the
      segmentation stage runs on cached embeddings; found by tracing the loss once per
      batch structure) are not passed to the jitted call at all. With the 632 M frozen
      ViT-H params passing through the step, the cached segmentation step took 28.8 ms
      on an H100; now 4.6 ms (README).
    donate: donate the input state's buffers (the caller must not reuse that state).

  Metrics returned: ``loss``, the aux terms, ``grad_norm`` (global norm of the gradients of
  the trainable params).
  """
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)

  def call_loss(params, batch, rng, step):
    if pass_step:
      return loss_fn(params, batch, rng, step)
    return loss_fn(params, batch, rng)

  if trainable is None:
    def step_fn(state: TrainState, batch: PyTree):
      rng = jax.random.fold_in(state.rng, state.step)
      (loss, aux), grads = jax.value_and_grad(
          lambda p: call_loss(p, batch, rng, state.step), has_aux=True)(state.params)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {**dict(aux), "loss": loss, "grad_norm": optax.tree.norm(grads)}
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=(repl, repl),
                   donate_argnums=(0,) if donate else ())

  splitter = _Splitter(trainable)

  def core_fn(core: TrainState, frozen: PyTree, batch: PyTree):
    """`core.params` holds the trainable leaves (None elsewhere), `frozen` the rest."""
    rng = jax.random.fold_in(core.rng, core.step)
    frozen_sg = jax.tree.map(jax.lax.stop_gradient, frozen)

    def f(tp):
      return call_loss(splitter.merge(tp, frozen_sg), batch, rng, core.step)

    (loss, aux), g_t = jax.value_and_grad(f, has_aux=True)(core.params)
    # The optimizer (over the full tree, e.g. `only_trainable`) sees zero gradients for the
    # frozen leaves; it maps them to zero updates that are discarded, so XLA drops them.
    zeros = jax.tree.map(jnp.zeros_like, frozen)
    updates, opt_state = optimizer.update(splitter.merge(g_t, zeros), core.opt_state,
                                          splitter.merge(core.params, frozen))
    new_t = optax.apply_updates(core.params, splitter.split(updates)[0])
    metrics = {**dict(aux), "loss": loss, "grad_norm": optax.tree.norm(g_t)}
    return core.replace(step=core.step + 1, params=new_t, opt_state=opt_state), metrics

  jitted = jax.jit(core_fn, in_shardings=(repl, repl, data), out_shardings=(repl, repl),
                   donate_argnums=(0,) if donate else ())

  reads_by_batch = {}  # batch treedef -> which param leaves the loss reads

  def step(state: TrainState, batch: PyTree):
    key = jax.tree.structure(batch)
    if key not in reads_by_batch:
      # Frozen leaves the loss never reads (the SAM encoder when the batch carries cached
      # embeddings) stay out of the jitted call: each argument costs host time per step.
      rng = jax.random.fold_in(state.rng, state.step)
      reads_by_batch[key] = splitter.reads(
          lambda p: call_loss(p, batch, rng, state.step), state.params)
    tp, fp = splitter.split(state.params, reads_by_batch[key])
    core, metrics = jitted(state.replace(params=tp), fp, batch)
    return core.replace(params=splitter.merge(core.params, state.params)), metrics

  step.jitted = jitted  # the compiled part, e.g. for `.lower()`
  step.splitter, step.reads_by_batch = splitter, reads_by_batch
  return step


def init_gan_state(params: Mapping[str, PyTree], g_optimizer: optax.GradientTransformation,
                   d_optimizer: optax.GradientTransformation, rng: jax.Array | int, *,
                   g_key: str = "generator", d_key: str = "discriminator") -> TrainState:
  """A `TrainState` whose params are ``{g_key: ..., d_key: ...}`` and whose
  opt_state is ``{"g": g_optimizer state, "d": d_optimizer state}``."""
  for k in (g_key, d_key):
    if k not in params:
      raise ValueError(f"params has no '{k}' subtree (keys: {sorted(params)})")

  state = TrainState.create(params, optax.identity(), rng)
  return state.replace(opt_state={"g": g_optimizer.init(params[g_key]),
                                  "d": d_optimizer.init(params[d_key])})


def make_gan_train_step(g_loss_fn: Callable, d_loss_fn: Callable,
                        g_optimizer: optax.GradientTransformation,
                        d_optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                        *, g_key: str = "generator", d_key: str = "discriminator",
                        donate: bool = True, g_post_update: Callable | None = None):
  """A jitted step for two param groups with separate optimizers (VQGAN-style).

  ``g_loss_fn(g_params, d_params, batch, rng, step) -> (loss, (aux, carry))``: the
  generator loss (the discriminator is held fixed); `carry` (e.g. the reconstructions)
  is passed, with `stop_gradient`, to
  ``d_loss_fn(d_params, carry, batch, rng, step) -> (loss, aux)``, the discriminator
  loss. Both use the params from before this step (like taming-transformers' two
  optimizer passes over one forward). State from `init_gan_state`. Metrics: ``loss``
  (generator), generator aux, ``d_loss`` and ``d/<name>`` for discriminator aux, and
  ``grad_norm`` / ``d_grad_norm``.

  ``g_post_update(g_params, batch, rng) -> (g_params, aux)``, if given, runs on the
  updated generator params inside the step (e.g. dead-code restarts of the tokenizers'
  codebooks, `stages.codebook_restart_fn`); its aux joins the metrics.
  """
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)

  def step_fn(state: TrainState, batch: PyTree):
    rng = jax.random.fold_in(state.rng, state.step)
    g_rng, d_rng = jax.random.split(rng)
    gp, dp = state.params[g_key], state.params[d_key]

    def gf(g):
      return g_loss_fn(g, jax.lax.stop_gradient(dp), batch, g_rng, state.step)

    (g_loss, (g_aux, carry)), g_grads = jax.value_and_grad(gf, has_aux=True)(gp)
    carry = jax.lax.stop_gradient(carry)

    def df(d):
      return d_loss_fn(d, carry, batch, d_rng, state.step)

    (d_loss, d_aux), d_grads = jax.value_and_grad(df, has_aux=True)(dp)
    g_upd, g_os = g_optimizer.update(g_grads, state.opt_state["g"], gp)
    d_upd, d_os = d_optimizer.update(d_grads, state.opt_state["d"], dp)
    params = dict(state.params)
    params[g_key] = optax.apply_updates(gp, g_upd)
    params[d_key] = optax.apply_updates(dp, d_upd)
    post_aux = {}
    if g_post_update is not None:
      params[g_key], post_aux = g_post_update(params[g_key], batch,
                                              jax.random.fold_in(rng, 1))
    metrics = {**dict(g_aux), **dict(post_aux), "loss": g_loss,
               "grad_norm": optax.tree.norm(g_grads),
               **{f"d/{k}": v for k, v in dict(d_aux).items()}, "d_loss": d_loss,
               "d_grad_norm": optax.tree.norm(d_grads)}
    new_state = state.replace(step=state.step + 1, params=type(state.params)(params),
                              opt_state={"g": g_os, "d": d_os})
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,) if donate else ())


@jax.jit
def _tree_all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass
class StageResult:
  """state: the stage's final state (or the restored final state if skipped);
  skipped: the stage was already complete; start_step: where this run began;
  restored_step / skipped_checkpoints: what the resume found; last_eval: the last eval
  metrics of this run (empty if none)."""
  state: TrainState
  skipped: bool
  start_step: int
  restored_step: int | None = None
  skipped_checkpoints: list = dataclasses.field(default_factory=list)
  last_eval: dict = dataclasses.field(default_factory=dict)


def _global_batch_size(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  return int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else 0


def run_stage(
    *,
    name: str,
    state: TrainState,
    train_step: Callable[[TrainState, PyTree], tuple[TrainState, Mapping[str, Any]]],
    data_iter: Iterator,
    num_steps: int,
    mesh: jax.sharding.Mesh,
    checkpointer: StageCheckpointer,
    workdir: str,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    log_every: int = 50,
    image_fn: Callable[[TrainState, int], Mapping[str, Any]] | None = None,
    image_every: int = 0,
    learning_rate: float | optax.Schedule | None = None,
    shard_fn: Callable[[PyTree], PyTree] | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> StageResult:
  """Runs (or resumes, or skips) one training stage.

  * If the checkpointer's stage-done marker exists, the stage is skipped and the state
    of its latest checkpoint is returned.
  * Otherwise the latest usable checkpoint (state + data iterator position) is restored,
    falling back past corrupt ones, and training continues from its step to `num_steps`.
    `state` is a template for the restore and, on a fresh start, the initial state; it is
    donated to the train step (do not reuse it).
  * Every `log_every` steps: mean of each scalar metric over the interval, ``lr``,
    ``step_time`` (s) and ``pairs_per_s`` (global batch / step time) go to TensorBoard
    (``<workdir>/tensorboard/<name>``) and ``<workdir>/metrics.jsonl`` (``split`` is
    ``<name>/train``); tqdm shows rate and ETA (process 0).
  * Every metric of every step is checked for NaN/Inf before anything is saved; a
    non-finite value raises `NonFiniteLossError` (step, term, last good checkpoint), and
    nothing after the last good checkpoint is written.
  * `eval_fn(state)` runs every `eval_every` steps and at the end; its metrics (e.g.
    ``val_miou``) are logged (``<name>/val``) and attached to a checkpoint saved at that
    step, which ranks it for best-k retention.
  * Checkpoints: every ``checkpointer.save_interval_steps``, at every eval, and at the
    end; then the stage-done marker is written.
  * `image_fn(state, step) -> {name: HWC/NHWC image}` every `image_every` steps.

  `data_iter` yields host-local numpy batches (pytrees, batch-major leaves) and has
  `get_state()` / `set_state()` (grain iterators do); it must not run out before
  `num_steps`. `shard_fn` places a batch on the mesh (default `shard_batch`).
  """
  primary = jax.process_index() == 0
  repl = mesh_lib.replicated(mesh)
  shard_fn = shard_fn or (lambda b: mesh_lib.shard_batch(b, mesh))

  if checkpointer.is_stage_done():
    restored = checkpointer.restore(state, "latest", mesh=mesh)
    if restored is None:
      raise RuntimeError(
          f"stage '{name}' is marked complete ({checkpointer.stage_done_path}) but "
          f"{checkpointer.directory} holds no checkpoint")
    log.info("stage '%s' already complete (step %d); skipping", name, restored.step)
    return StageResult(restored.state, True, restored.step, restored.step,
                       restored.skipped)

  restored = checkpointer.restore(state, "latest", data_iter=data_iter, mesh=mesh,
                                  quarantine_corrupt=True)
  if restored is not None:
    state = restored.state
    log.info("stage '%s': resuming from checkpoint %d", name, restored.step)
  else:
    state = jax.device_put(state, repl)
  start = int(jax.device_get(state.step))
  last_ckpt = restored.step if restored is not None else None
  if start > num_steps:
    raise ValueError(f"stage '{name}': checkpoint step {start} is beyond num_steps "
                     f"{num_steps}")

  writer = MetricWriter(workdir, tensorboard=tensorboard,
                        purge_step=(start + 1) if start else None,
                        tb_subdir=os.path.join("tensorboard", name))
  if start:
    writer.write_scalars(start, {"resumed_from_step": start}, split=f"{name}/event")
  pbar = None
  if progress and primary:
    from tqdm.auto import tqdm  # noqa: PLC0415
    pbar = tqdm(total=num_steps, initial=start, desc=name, dynamic_ncols=True,
                unit="step")

  pending: list[tuple[int, Any]] = []
  interval_sums: dict[str, float] = {}
  interval_n = 0
  t_mark, pairs, steps_t = time.perf_counter(), 0, 0
  last_eval: dict = {}
  step = start
  try:
    while step < num_steps:
      try:
        batch = next(data_iter)
      except StopIteration:
        raise RuntimeError(f"stage '{name}': the data iterator ran out at step {step} of "
                           f"{num_steps}; make the training iterator repeat") from None
      gbatch = shard_fn(batch)
      pairs += _global_batch_size(gbatch)
      state, metrics = train_step(state, gbatch)
      step += 1
      steps_t += 1
      pending.append((step, metrics))
      if pbar is not None:
        pbar.update(1)

      final = step == num_steps
      do_log = final or (log_every > 0 and step % log_every == 0)
      do_eval = eval_fn is not None and (final or (eval_every > 0 and step % eval_every == 0))
      do_save = final or do_eval or checkpointer.should_save(step)
      do_img = image_fn is not None and image_every > 0 and step % image_every == 0
      if not (do_log or do_save or do_img):
        continue

      # Flush: every step's metrics are checked before anything is written.
      host = jax.device_get([m for _, m in pending])
      for (s, _), m in zip(pending, host):
        guards.check_finite(m, s, last_ckpt)
        for k, v in m.items():
          a = np.asarray(v)
          if a.size == 1 and a.dtype.kind in "biuf":
            interval_sums[k] = interval_sums.get(k, 0.0) + float(a.reshape(()))
        interval_n += 1
      pending.clear()

      if do_log:
        dt = time.perf_counter() - t_mark
        scalars = {k: v / interval_n for k, v in interval_sums.items()}
        scalars["step_time"] = dt / max(steps_t, 1)
        scalars["pairs_per_s"] = pairs / dt if dt > 0 else float("nan")
        if learning_rate is not None:
          scalars["lr"] = learning_rate_at(learning_rate, step - 1)
        writer.write_scalars(step, scalars, split=f"{name}/train")
        if pbar is not None:
          pbar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}", refresh=False)
        interval_sums, interval_n = {}, 0
        t_mark, pairs, steps_t = time.perf_counter(), 0, 0

      if do_eval:
        last_eval = {k: float(v) for k, v in dict(eval_fn(state)).items()}
        writer.write_scalars(step, last_eval, split=f"{name}/val")
        log.info("stage '%s' step %d eval: %s", name, step, last_eval)

      if do_save:
        if not bool(_tree_all_finite(state.params)):
          raise guards.NonFiniteLossError(step, "params", float("nan"), last_ckpt)
        checkpointer.save(step, state, data_iter=data_iter, metrics=last_eval if do_eval
                          else None, meta={"stage": name, "num_steps": num_steps}, force=True)
        last_ckpt = step

      if do_img:
        writer.write_images(step, image_fn(state, step), split=f"{name}/train")
      if do_log or do_eval:
        writer.flush()
      if do_save or do_eval:
        # keep save/eval time out of the throughput
        t_mark, pairs, steps_t = time.perf_counter(), 0, 0
    checkpointer.mark_stage_done({"step": step, "num_steps": num_steps,
                                  "last_eval": last_eval, "time": time.time()})
  finally:
    try:
      checkpointer.wait()
    finally:
      if pbar is not None:
        pbar.close()
      writer.close()
  return StageResult(state, False, start, restored.step if restored is not None else None,
                     restored.skipped if restored is not None else [], last_eval)
