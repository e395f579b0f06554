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
import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionsam_jax.jit_utils import CompileClock
from fusionsam_jax.training import guards, mesh as mesh_lib
from fusionsam_jax.training.checkpointing import StageCheckpointer
from fusionsam_jax.training.logging import MetricWriter, progress_bar
from fusionsam_jax.training.state import learning_rate_at, TrainState

log = logging.getLogger(__name__)

PyTree = Any
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


class DevicePrefetch:
  """Pulls host batches from `it` in a background thread and places them on the mesh
  (`shard_fn`) `size` steps ahead, so data loading and host-to-device copies overlap the
  running step. Keeps, with each batch, the source iterator's state *after* it, so that
  `get_state()` is the state of the last batch handed out (a checkpoint resumes exactly
  there). `wait_s` accumulates the time `next()` blocked (the loop logs it as
  ``data_wait``)."""

  _END = object()

  def __init__(self, it: Iterator, shard_fn: Callable, size: int = 2):
    self._it, self._shard = it, shard_fn
    self._q: "queue.Queue" = queue.Queue(maxsize=max(1, size))
    self._state = it.get_state() if hasattr(it, "get_state") else None
    self._stop = threading.Event()
    self.wait_s = 0.0
    self._thread = threading.Thread(target=self._run, daemon=True, name="device-prefetch")
    self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        try:
          batch = next(self._it)
        except StopIteration:
          self._q.put((self._END, None, None))
          return
        st = self._it.get_state() if hasattr(self._it, "get_state") else None
        placed = self._shard(batch)
        while not self._stop.is_set():
          try:
            self._q.put((placed, st, batch), timeout=0.1)
            break
          except Exception:  # queue.Full
            continue
    except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
      self._q.put((e, None, None))

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    placed, st, _ = self._q.get()
    self.wait_s += time.perf_counter() - t0
    if placed is self._END:
      raise StopIteration
    if isinstance(placed, BaseException):
      raise placed
    self._state = st
    return placed

  def get_state(self):
    return self._state

  def close(self):
    self._stop.set()
    try:
      while True:
        self._q.get_nowait()
    except Exception:  # noqa: BLE001 -- queue.Empty
      pass
    self._thread.join(timeout=5)


def _ready(metrics) -> bool:
  x = metrics.get("loss") if isinstance(metrics, Mapping) else None
  leaves = [x] if x is not None else jax.tree.leaves(metrics)
  return all(y.is_ready() for y in leaves if hasattr(y, "is_ready"))


def _completed_prefix(pending, step: int, since: int = 0) -> int:
  """The last step whose metrics (so every earlier step's too) are computed; `since`:
  an index into `pending` known to be complete before it (checked without blocking)."""
  last = step - len(pending) + since
  for s, m in pending[since:]:
    if not _ready(m):
      break
    last = s
  return last


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
    train_step: Callable[[TrainState, PyTree, PyTree], tuple[TrainState, Mapping[str, Any]]],
    data_iter: Iterator,
    frozen: PyTree = None,
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
    prefetch: int = 2,
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

  `train_step(state, frozen, batch)`: `frozen` (the frozen params the step reads) is
  passed unchanged to every step. `data_iter` yields host-local numpy batches (pytrees,
  batch-major leaves) and has `get_state()` / `set_state()` (grain iterators do); it must
  not run out before `num_steps`. `shard_fn` places a batch on the mesh (default
  `shard_batch`); a `DevicePrefetch` thread runs it `prefetch` steps ahead. ``data_wait`` (s per
  step the loop waited for data) is logged with ``step_time``.
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

  frozen = jax.device_put(frozen if frozen is not None else {}, repl)
  batches = DevicePrefetch(data_iter, shard_fn, size=prefetch) if start < num_steps else None
  writer = MetricWriter(workdir, tensorboard=tensorboard,
                        purge_step=(start + 1) if start else None,
                        tb_subdir=os.path.join("tensorboard", name))
  # What a killed run logged after its last checkpoint is logged again: no duplicate rows.
  writer.drop_rows_after(start, f"{name}/")
  if start:
    writer.write_scalars(start, {"resumed_from_step": start}, split=f"{name}/event")
  pbar = None
  if progress and primary:
    pbar = progress_bar(total=num_steps, initial=start, desc=name, dynamic_ncols=True,
                        unit="step")

  pending: list[tuple[int, Any]] = []
  interval_sums: dict[str, float] = {}
  interval_n = 0
  clock = CompileClock()
  compiled_before = clock.snapshot()
  t_mark, pairs, steps_t = time.perf_counter(), 0, 0
  wait_mark = 0.0
  last_eval: dict = {}
  step = start
  try:
    while step < num_steps:
      try:
        gbatch = next(batches)
      except StopIteration:
        raise RuntimeError(f"stage '{name}': the data iterator ran out at step {step} of "
                           f"{num_steps}; make the training iterator repeat") from None
      pairs += _global_batch_size(gbatch)
      state, metrics = train_step(state, frozen, gbatch)
      step += 1
      steps_t += 1
      if step == start + 1:
        # The first step of a run compiles: its time is an event, not throughput.
        jax.block_until_ready(metrics)
        # first_data_wait_s: of that, waiting for the first batch (loader start-up);
        # compile_*: of that, JAX's tracing, lowering and XLA compile or persistent-cache
        # load (cache_read_s: reading cached executables), summed over the programs built.
        compiled = CompileClock.since(compiled_before, clock.snapshot())
        writer.write_scalars(step, {"first_step_s": time.perf_counter() - t_mark,
                                    "first_data_wait_s": batches.wait_s,
                                    **{f"compile_{k}": v for k, v in compiled.items()}},
                             split=f"{name}/event")
        t_mark, pairs, steps_t = time.perf_counter(), 0, 0
        wait_mark = batches.wait_s
      pending.append((step, metrics))
      if pbar is not None:
        # The bar counts completed steps, not dispatched ones (dispatch runs ahead of the
        # device): steps whose metrics are ready, checked without blocking.
        done = _completed_prefix(pending, step, max(0, pbar.n - (step - len(pending))))
        pbar.update(max(0, done - pbar.n))

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
      if pbar is not None:
        pbar.update(step - pbar.n)

      if do_log:
        dt = time.perf_counter() - t_mark
        scalars = {k: v / interval_n for k, v in interval_sums.items()}
        scalars["step_time"] = dt / max(steps_t, 1)
        scalars["pairs_per_s"] = pairs / dt if dt > 0 else float("nan")
        scalars["data_wait"] = (batches.wait_s - wait_mark) / max(steps_t, 1)
        if learning_rate is not None:
          scalars["lr"] = learning_rate_at(learning_rate, step - 1)
        writer.write_scalars(step, scalars, split=f"{name}/train")
        if pbar is not None:
          pbar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}", refresh=False)
        interval_sums, interval_n = {}, 0
        t_mark, pairs, steps_t = time.perf_counter(), 0, 0
        wait_mark = batches.wait_s

      if do_eval:
        t_eval = time.perf_counter()
        last_eval = {k: float(v) for k, v in dict(eval_fn(state)).items()}
        writer.write_scalars(step, {"eval_s": time.perf_counter() - t_eval},
                             split=f"{name}/event")
        writer.write_scalars(step, last_eval, split=f"{name}/val")
        if primary:
          shown = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
          msg = f"stage '{name}' step {step}: {shown}"
          if pbar is not None:
            pbar.set_postfix(**{k: f"{v:.4f}" for k, v in last_eval.items()}, refresh=False)
            pbar.write(msg)
          else:
            print(msg, flush=True)

      if do_save:
        if not bool(_tree_all_finite(state.params)):
          raise guards.NonFiniteLossError(step, "params", float("nan"), last_ckpt)
        checkpointer.save(step, state, data_iter=batches, metrics=last_eval if do_eval
                          else None, meta={"stage": name, "num_steps": num_steps}, force=True)
        last_ckpt = step

      if do_img:
        writer.write_images(step, image_fn(state, step), split=f"{name}/train")
      if do_log or do_eval:
        writer.flush()
      if do_save or do_eval or do_img:
        # keep save/eval/image time out of the throughput
        t_mark, pairs, steps_t = time.perf_counter(), 0, 0
        wait_mark = batches.wait_s
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      writer.write_scalars(step, {"peak_bytes": float(stats["peak_bytes_in_use"])},
                           split=f"{name}/event")
    checkpointer.mark_stage_done({"step": step, "num_steps": num_steps,
                                  "last_eval": last_eval, "time": time.time()})
  except guards.NonFiniteLossError as e:
    e.stage = name
    raise
  finally:
    if batches is not None:
      batches.close()
    try:
      checkpointer.wait()
    finally:
      if pbar is not None:
        pbar.close()
      writer.close()
  return StageResult(state, False, start, restored.step if restored is not None else None,
                     restored.skipped if restored is not None else [], last_eval)
