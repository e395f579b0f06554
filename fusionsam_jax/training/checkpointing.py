"""Checkpoints of a training stage: Orbax `CheckpointManager` with fallbacks.

One `StageCheckpointer` manages one directory (one training stage). Each checkpoint step
holds three items:

* ``state``: the `TrainState` pytree (step, params, opt_state, rng), `args.StandardSave`;
* ``data_iter``: the data iterator's state, through grain's Orbax handler
  (``process_<i>-of-<n>.json``, one file per process, so multi-host works);
* ``meta``: a small JSON (stage name, step, config fingerprint, eval metrics, ...).

Retention keeps the `keep_latest` newest checkpoints plus the `best_k` best by a
validation metric (`best_metric`, e.g. ``val_miou``, `best_mode` "max"/"min"). Only
checkpoints saved with that metric compete for "best"; never pass test-set metrics.

`restore` walks back from the requested checkpoint: a checkpoint that fails to load
(truncated or missing files, unreadable JSON) is reported through `logging` and in the
returned `Restored.skipped`, and the previous one is tried; `CheckpointRestoreError` is
raised if none is usable. Orbax writes each step into a temporary directory and renames it
when complete, so a run killed mid-save leaves only a temporary directory, which is removed
when the manager is next opened (`cleanup_tmp_directories`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Iterable, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from fusionsam_jax.fsutil import atomic_write
from fusionsam_jax.training import mesh as mesh_lib

log = logging.getLogger(__name__)

STATE = "state"
DATA_ITER = "data_iter"
META = "meta"
STAGE_DONE_FILE = "STAGE_DONE.json"


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a directory could be restored."""


class CheckpointMismatchError(CheckpointRestoreError):
  """A checkpoint is readable but holds a different structure (param names / shapes) than
  the model being restored: the config changed, the checkpoint is not corrupt."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_shapes(tree: Any) -> dict[str, tuple]:
  """``{"a/b/0/c": shape}`` for every array leaf of `tree` (a state, its abstract version or
  Orbax's metadata tree of it: the same paths for all three)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    out["/".join(_key_name(k) for k in path)] = tuple(int(d) for d in shape)
  return out


def shape_differences(stored: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
  """What differs between two `leaf_shapes` (empty: the same structure)."""
  diff = [f"{k}: {stored[k]} in the checkpoint, {wanted[k]} now"
          for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
  diff += [f"{k}: only in the checkpoint" for k in sorted(set(stored) - set(wanted))]
  diff += [f"{k}: not in the checkpoint" for k in sorted(set(wanted) - set(stored))]
  return diff


@dataclasses.dataclass
class Restored:
  """What `StageCheckpointer.restore` found.

  state: the restored pytree; step: its checkpoint step; meta: the JSON metadata saved
  with it; skipped: ``[(step, reason), ...]`` for checkpoints that failed to load and were
  passed over (newest first); iterator_restored: whether the data iterator state was set.
  """
  state: Any
  step: int
  meta: dict
  skipped: list
  iterator_restored: bool


class _IterStateBox:
  """Carries a snapshot of an iterator's state through grain's Orbax handler.

  grain's handler calls ``get_state()`` (bytes) on save and ``set_state(bytes)`` +
  ``start_prefetch()`` on restore. The box stores an envelope that records whether the
  real iterator speaks bytes (`grain.DataLoader` iterators) or JSON-able dicts
  (`grain.DatasetIterator`).
  """

  def __init__(self, state: Any = None):
    self.envelope = None
    if state is not None:
      if isinstance(state, (bytes, bytearray)):
        self.envelope = {"format": "bytes", "state": bytes(state).decode()}
      else:
        self.envelope = {"format": "json", "state": state}

  def get_state(self) -> bytes:
    return json.dumps(self.envelope).encode()

  def set_state(self, state: bytes) -> None:
    env = json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state)
    if not isinstance(env, dict) or env.get("format") not in ("bytes", "json"):
      raise ValueError(f"iterator state envelope is malformed: {str(env)[:200]}")
    self.envelope = env

  def start_prefetch(self) -> None:
    pass

  def unwrap(self) -> Any:
    if self.envelope["format"] == "bytes":
      return self.envelope["state"].encode()
    return self.envelope["state"]


def _metric_value(metrics: Mapping | None, key: str) -> float | None:
  if not isinstance(metrics, Mapping) or key not in metrics:
    return None
  try:
    v = float(metrics[key])
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """ShapeDtypeStructs for `tree` (keeping each leaf's sharding unless one is given)."""
  def f(x):
    s = ocp.utils.to_shape_dtype_struct(x)
    if sharding is not None:
      s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
    return s
  return jax.tree.map(f, tree)


class StageCheckpointer:
  """Checkpoints of one training stage in `directory`.

  Args:
    directory: checkpoint directory (created if missing).
    save_interval_steps: `should_save(step)` is True every this many steps.
    keep_latest: how many of the newest checkpoints to keep (>= 1).
    best_k: how many best-by-`best_metric` checkpoints to keep in addition (0: none).
    best_metric, best_mode: the validation metric and whether higher ("max") or lower
      ("min") is better.
    async_save: write checkpoints in a background thread (Orbax async checkpointing);
      `wait()` blocks until written.
    stage: stage name written into each checkpoint's metadata.
    config_fingerprint: written into metadata.
    read_only: a reader (evaluate, predict) that may run next to a training run: Orbax's
      temporary folders (a save in progress) are left alone.
    say: one-line notes for the user (a quarantined checkpoint); default `logging`.
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1000,
               keep_latest: int = 1, best_k: int = 3, best_metric: str = "val_miou",
               best_mode: str = "max", async_save: bool = True, stage: str = "",
               config_fingerprint: str | None = None, read_only: bool = False,
               say: Callable[[str], None] | None = None):
    if keep_latest < 1:
      raise ValueError(f"keep_latest must be >= 1, got {keep_latest}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_interval_steps = save_interval_steps
    self.best_metric, self.best_mode = best_metric, best_mode
    self.stage, self.config_fingerprint = stage, config_fingerprint
    self.say = say or log.warning
    worst = -math.inf if best_mode == "max" else math.inf

    def best_fn(metrics):
      v = _metric_value(metrics, best_metric)
      return worst if v is None else v

    policies = [pp.LatestN(n=keep_latest)]
    if best_k > 0:
      policies.append(pp.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"),
                               n=best_k, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  # -- queries ---------------------------------------------------------------------
  @property
  def manager(self) -> ocp.CheckpointManager:
    """The underlying Orbax manager."""
    return self._mngr

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def metrics(self, step: int) -> dict | None:
    return self._mngr.metrics(step)

  def best_steps(self) -> list[int]:
    """Steps saved with a finite `best_metric`, best first."""
    scored = []
    for s in self.all_steps():
      v = _metric_value(self._mngr.metrics(s), self.best_metric)
      if v is not None:
        scored.append((v, s))
    scored.sort(key=lambda vs: (-vs[0] if self.best_mode == "max" else vs[0], -vs[1]))
    return [s for _, s in scored]

  def best_step(self) -> int | None:
    b = self.best_steps()
    return b[0] if b else None

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.save_interval_steps == 0

  # -- save ------------------------------------------------------------------------
  def save(self, step: int, state: Any, *, data_iter: Any = None,
           metrics: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves `state` (and the iterator's current state) as checkpoint `step`.

    Saves only if `force` or `should_save(step)`; returns whether it saved. `metrics`
    (e.g. ``{"val_miou": 0.5}``) ranks the checkpoint for best-k retention. An existing
    checkpoint at `step` is left alone (returns False).
    """
    if not (force or self.should_save(step)):
      return False
    if step in self._mngr.all_steps():
      log.info("checkpoint for step %d already exists in %s; not saving", step,
               self.directory)
      return False
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    info = {"stage": self.stage, "step": int(step), "time": time.time(),
            "config_fingerprint": self.config_fingerprint, "metrics": metrics,
            **dict(meta or {})}
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(info)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(_IterStateBox(data_iter.get_state()))
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                            force=True)
    if saved:
      log.info("saving checkpoint %d to %s%s", step, self.directory,
               f" (metrics {metrics})" if metrics else "")
    return saved

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written (re-raises their errors)."""
    self._mngr.wait_until_finished()
    self._mngr.check_for_errors()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restore ---------------------------------------------------------------------
  def _candidates(self, step: int | str) -> list[int]:
    steps = self.all_steps()
    if step == "latest":
      return steps[::-1]
    if step == "best":
      best = self.best_steps()
      if not best:
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} was saved with metric "
            f"'{self.best_metric}'; cannot restore 'best' (steps present: {steps})")
      return best
    if isinstance(step, int):
      if step not in steps:
        raise CheckpointRestoreError(
            f"no checkpoint for step {step} in {self.directory} (steps present: {steps})")
      return [step]
    raise ValueError(f"step must be 'latest', 'best' or an int, got {step!r}")

  def restore(self, template: Any, step: int | str = "latest", *, data_iter: Any = None,
              mesh: jax.sharding.Mesh | None = None, quarantine_corrupt: bool = False,
              ) -> Restored | None:
    """Restores a checkpoint into the structure of `template`.

    Args:
      template: a pytree (e.g. a freshly created `TrainState`) or its abstract version;
        gives the structure, dtypes and (unless `mesh`) shardings.
      step: "latest", "best" (by `best_metric`) or an int step. For "latest"/"best" a
        checkpoint that fails to load is skipped (warning + `Restored.skipped`) and the
        next older / next best is tried.
      data_iter: if given, its state is set from the checkpoint (`set_state`).
      mesh: if given, arrays are restored replicated on this mesh.
      quarantine_corrupt: move checkpoints that failed to load to
        ``<directory>_corrupt/<step>-<time>`` (saying so) so that training can save that
        step again; with step "latest", when none loads, return None (start afresh).

    Returns:
      `Restored`, or None if the directory has no (usable, with `quarantine_corrupt`)
      checkpoint and step == "latest".

    Raises:
      CheckpointMismatchError: a checkpoint holds other param names / shapes than
        `template` (a config change, not corruption: nothing is quarantined).
      CheckpointRestoreError: checkpoints exist but none of the candidates loads, or the
        requested step / best checkpoint does not exist.
    """
    self._mngr.reload()
    if step == "latest" and not self.all_steps():
      return None
    candidates = self._candidates(step)
    sharding = mesh_lib.replicated(mesh) if mesh is not None else None
    abstract = abstract_like(template, sharding)
    skipped = []
    for s in candidates:
      diff = self.structure_differences(s, abstract)
      if diff:
        raise CheckpointMismatchError(
            f"checkpoint {s} in {self.directory} does not fit this config's model: "
            + "; ".join(diff[:3]) + (f" ({len(diff)} differences)" if len(diff) > 3 else "")
            + ". It is kept; use the config it was trained with, or another workdir")
      try:
        restored, meta, it_state = self._restore_one(s, abstract, data_iter is not None)
      except Exception as e:  # noqa: BLE001 -- any failure makes the checkpoint unusable
        first = (str(e).strip().splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {first[:300]}"
        log.warning("checkpoint %d in %s could not be restored (%s); trying the previous "
                    "one", s, self.directory, reason)
        skipped.append((s, reason))
        continue
      iterator_restored = False
      if data_iter is not None:
        if it_state is None:
          log.warning("checkpoint %d has no data iterator state; the iterator starts "
                      "from its current position", s)
        else:
          data_iter.set_state(it_state)
          iterator_restored = True
      if skipped:
        log.warning("restored checkpoint %d after skipping unusable checkpoint(s) %s", s,
                    [x for x, _ in skipped])
        if quarantine_corrupt:
          self.quarantine(skipped)
      return Restored(restored, s, meta, skipped, iterator_restored)
    if quarantine_corrupt and skipped:
      self.quarantine(skipped)
      if step == "latest":
        self.say(f"stage '{self.stage}': no usable checkpoint left in {self.directory}; "
                 "the stage starts from the beginning")
        return None
    details = "; ".join(f"step {s}: {r}" for s, r in skipped)
    raise CheckpointRestoreError(
        f"no usable checkpoint in {self.directory} (tried {candidates}): {details}")

  def _restore_one(self, step: int, abstract: Any, want_iter: bool):
    step_dir = os.path.join(self.directory, str(step))
    has_iter = os.path.isdir(os.path.join(step_dir, DATA_ITER))
    items = {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
    box = None
    if want_iter and has_iter:
      box = _IterStateBox()
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(box)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    meta = out[META]
    if not isinstance(meta, dict):
      raise ValueError(f"metadata of checkpoint {step} is not a JSON object: {meta!r}")
    if box is not None and box.envelope is None:
      raise ValueError(f"data iterator state of checkpoint {step} is empty")
    state = out[STATE]
    jax.block_until_ready(state)
    return state, meta, (box.unwrap() if box is not None else None)

  def structure_differences(self, step: int, template: Any) -> list[str] | None:
    """How checkpoint `step`'s state differs from `template` in param names and shapes
    ([]: it fits; None: its metadata cannot be read, i.e. it is corrupt)."""
    try:
      md = ocp.PyTreeCheckpointHandler().metadata(
          epath.Path(os.path.join(self.directory, str(step), STATE)))
      tree = getattr(md, "tree", md)
      stored = leaf_shapes(tree)
    except Exception:  # noqa: BLE001 -- unreadable metadata: corrupt, not a mismatch
      return None
    if not stored:
      return None
    return shape_differences(stored, leaf_shapes(template))

  def verify(self, template: Any, step: int, *, mesh: jax.sharding.Mesh | None = None
             ) -> str | None:
    """None if checkpoint `step` restores into `template`, else the reason (one line).
    Raises `CheckpointMismatchError` for a checkpoint of another model."""
    try:
      self.restore(template, int(step), mesh=mesh)
    except CheckpointMismatchError:
      raise
    except CheckpointRestoreError as e:
      return str(e)
    return None

  def quarantine(self, steps: Iterable[tuple[int, str]]) -> None:
    """Moves checkpoints ``[(step, reason)]`` to ``<directory>_corrupt/<step>-<time>``,
    saying so (one line each)."""
    steps = list(steps)
    if jax.process_index() == 0:
      dest_root = self.directory.rstrip("/") + "_corrupt"
      os.makedirs(dest_root, exist_ok=True)
      for s, reason in steps:
        src = os.path.join(self.directory, str(s))
        if os.path.exists(src):
          dest = os.path.join(dest_root, f"{s}-{int(time.time())}")
          shutil.move(src, dest)
          self.say(f"checkpoint {s} of stage '{self.stage}' is unusable ({reason[:200]}); "
                   f"moved it to {dest}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("fusionsam_quarantine")
    self._mngr.reload()

  # -- stage completion --------------------------------------------------------------
  @property
  def stage_done_path(self) -> str:
    return os.path.join(self.directory, STAGE_DONE_FILE)

  def is_stage_done(self) -> bool:
    return os.path.exists(self.stage_done_path)

  def stage_done_info(self) -> dict | None:
    if not self.is_stage_done():
      return None
    with open(self.stage_done_path) as f:
      return json.load(f)

  def unmark_stage_done(self) -> None:
    """Removes the completion marker (the stage's final checkpoint was lost)."""
    if jax.process_index() == 0 and self.is_stage_done():
      os.unlink(self.stage_done_path)

  def mark_stage_done(self, info: Mapping[str, Any]) -> None:
    """Waits for pending saves, then writes the completion marker atomically."""
    self.wait()
    if jax.process_index() == 0:
      atomic_write(self.stage_done_path,
                        json.dumps({"stage": self.stage, **dict(info)}, indent=2))
