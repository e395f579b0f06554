"""A training run's folder: its config record, the SAM weights it was trained with, and the
stages' checkpointers.

    WORKDIR/config.json        the config (guarded: a different config is refused)
    WORKDIR/sam_weights.json   the converted SAM checkpoint: path, sha256 of its files
    WORKDIR/checkpoints/<stage>/<step>/   Orbax: the stage's TrainState only (what it trains)
    WORKDIR/metrics.jsonl, tensorboard/, embedding_cache/, eval_*.json

Frozen params are never copied into checkpoints: a run's full params are the converted SAM
weights (checked against the record) + the seeded random init + each stage's trained params.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os

import jax

from fusionsam_jax import config_lib, locking
from fusionsam_jax.fsutil import atomic_write
from fusionsam_jax.errors import (NoCheckpointError, SamWeightsChangedError,
                                  SamWeightsMissingError, SetupError, WorkdirError)
from fusionsam_jax.training import checkpointing, guards

#: Config keys that may change between runs in one workdir: durations, cadences, evaluation
#: settings, where the data and the (identical, sha256-checked) SAM weights are.
#: ("*" stands for any one key: every stage's durations.)
MUTABLE_CONFIG_KEYS = (
    "train.stages.*.num_steps", "train.stages.*.num_epochs",
    "train.log_every", "train.image_every", "train.worker_count", "train.device_prefetch",
    "train.checkpoint_every",
    "train.eval_every", "train.eval_every_epochs", "train.keep_latest", "train.best_k", "eval",
    "data_dir", "model.sam_checkpoint", "model.sam2_checkpoint",
)
#: Config keys added after workdirs were made, with the value a workdir without them ran with.
ADDED_CONFIG_KEYS = {"model.backbone": "sam", "model.sam2_checkpoint": None,
                     "train.stages.tokenizer.restart_threshold_relative": False,
                     "train.stages.tokenizer.code_ema": None, "model.train_dtype": "float32",
                     "model.fmp.cross_num_heads": None}
SAM_RECORD = "sam_weights.json"
CONFIG_FILE = guards.CONFIG_FILE


# -- the workdir itself ---------------------------------------------------------------------------


def open_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; `WorkdirError` (one line) when it is a file, cannot be
  created or is not writable. Returns its absolute path."""
  workdir = os.path.abspath(os.fspath(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder: pass a folder (it is "
                       "created if missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be created: {e.strerror or e}") from None
  probe = os.path.join(workdir, f".write-test-{os.getpid()}")
  try:
    with open(probe, "w"):
      pass
    os.unlink(probe)
  except OSError as e:
    why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
    raise WorkdirError(f"--workdir {workdir} is not writable ({why}): pass a folder this "
                       "user can write") from None
  return workdir


#: Temporary names of the workdir's writers (atomic writes, embedding-cache builds, Orbax
#: saves): anything matching in the workdir while its lock is held is an orphan of a killed run.
_ORPHANS = (
    lambda n: ".tmp-" in n,                                   # fsutil.atomic_file
    lambda n: n.startswith(".write-test-"),                   # open_workdir's probe
    lambda n: n.startswith((".train-", ".val-")),             # embedding-cache builds
    lambda n: ".orbax-checkpoint-tmp" in n,                   # Orbax saves in progress
)


def lock(workdir: str, say=None):
  """The workdir's exclusive lock (`locking.DirLock`; process 0 only, the others write
  nothing but their shards); a context manager. Raises `locking.DirLockedError` naming the
  holder when another run has it."""
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return locking.DirLock(workdir, what="workdir", say=say)


def remove_orphans(workdir: str, say=None) -> list[str]:
  """Removes what killed runs left in `workdir` (call with its lock held); says so."""
  if jax.process_index() != 0:
    return []
  ckpt = os.path.join(os.fspath(workdir), "checkpoints")
  stages = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
  return locking.remove_orphans(
      workdir, _ORPHANS, say=say,
      recursive_dirs=["checkpoints", "embedding_cache",
                      *(os.path.join("checkpoints", s) for s in stages)])


def check_config(workdir: str, config, *, allow_change: bool = False
                 ) -> tuple[str, list[str] | None]:
  """Compares `config` with the workdir's (writes nothing): refuses a different one
  (`ConfigMismatchError`, listing the differences) unless `allow_change`. Returns
  (fingerprint, differences: None for a new workdir, [] for the same config); `store_config`
  writes it once everything else the run needs has been checked."""
  return guards.compare_workdir_config(workdir, config, ignore=MUTABLE_CONFIG_KEYS,
                                       allow_change=allow_change, added=ADDED_CONFIG_KEYS)


def store_config(workdir: str, config) -> None:
  """Writes ``config.json`` (the old one, if any, is kept as ``config.<time>.json``), with
  its paths absolute (`config_lib.with_absolute_paths`)."""
  config = config_lib.with_absolute_paths(config)
  guards.store_workdir_config(workdir, config, ignore=MUTABLE_CONFIG_KEYS,
                              added=ADDED_CONFIG_KEYS)


def load_config(workdir: str):
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise SetupError(f"{path} does not exist: {workdir} is not a training workdir "
                     "(python -m fusionsam_jax.train --config ... --workdir ...)")
  with open(path) as f:
    return config_lib.config_from_dict(json.load(f)["config"])


def check_config_matches(config, workdir: str) -> None:
  """Raises `ConfigMismatchError` if `config` differs from the workdir's stored config
  (outside `MUTABLE_CONFIG_KEYS`)."""
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    stored = json.load(f)["config"]
  diff = guards.config_diff(stored, config, MUTABLE_CONFIG_KEYS, ADDED_CONFIG_KEYS)
  if diff:
    raise guards.ConfigMismatchError(
        f"workdir {workdir} was trained with a different config ({path}): "
        + "; ".join(diff[:20]) + ". Pass the config it was trained with (or none: the "
        "stored one is used).")


def config_for_evaluation(config, workdir: str):
  """The config to evaluate / predict `workdir` with when the user also passed `config`:
  the stored one (so paths and settings are the run's own), with the given config's
  ``eval.*`` settings. Raises `ConfigMismatchError` naming the keys when `config` is another
  run's (beyond `MUTABLE_CONFIG_KEYS`). The given config's paths (data_dir, SAM weights)
  re-point the run's (moved data or weights; other weights are refused by sha256); a
  data_dir that does not exist while the run's does is refused naming both (a config file's
  default ``data_cache`` passed by mistake)."""
  check_config_matches(config, workdir)
  if not os.path.isfile(os.path.join(os.fspath(workdir), CONFIG_FILE)):
    return config   # nothing stored: what needs a trained run says so
  stored = load_config(workdir)
  given = config.to_dict()
  merged = stored.to_dict()
  merged["eval"] = dict(given.get("eval", merged.get("eval", {})))
  for key in config_lib.PATH_KEYS:
    *parents, leaf = key.split(".")
    src, dst = given, merged
    for p in parents:
      src, dst = (src or {}).get(p), (dst or {}).get(p)
    if not isinstance(src, dict) or not isinstance(dst, dict):
      continue
    old, new = dst.get(leaf), src.get(leaf)
    if not new or new == old or os.path.abspath(new) == old:
      continue
    if not os.path.exists(new) and old and os.path.exists(old) and key == "data_dir":
      raise guards.ConfigMismatchError(
          f"--config data_dir={new!r} does not exist; {workdir} was trained on "
          f"data_dir={old!r}: leave --config out (the run's own config is used) or point "
          "--config.data_dir at the data")
    dst[leaf] = new   # re-pointed (other SAM weights are then refused by their sha256)
  return config_lib.config_from_dict(merged)


# -- the SAM weights a run was trained with -----------------------------------------------------


def _files(ckpt_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(ckpt_dir):
    out += [os.path.relpath(os.path.join(root, n), ckpt_dir) for n in names]
  return sorted(out)


def _stat_signature(ckpt_dir: str) -> dict:
  return {f: [os.path.getsize(os.path.join(ckpt_dir, f)),
              os.stat(os.path.join(ckpt_dir, f)).st_mtime_ns] for f in _files(ckpt_dir)}


def sam_digest(ckpt_dir: str) -> str:
  """sha256 over the relative paths and bytes of every file of a converted checkpoint."""
  h = hashlib.sha256()
  for f in _files(ckpt_dir):
    h.update(f.encode() + b"\0")
    with open(os.path.join(ckpt_dir, f), "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 22), b""):
        h.update(chunk)
  return h.hexdigest()


def record_sam_weights(workdir: str, path: str | None) -> None:
  """Records (first run) or checks (later runs) the converted SAM checkpoint at `path`
  (None: a random SAM, recorded as such). The path may move; the content may not."""
  rec_path = os.path.join(os.fspath(workdir), SAM_RECORD)
  if not os.path.isfile(rec_path):
    rec = {"path": None, "sha256": None, "random": True} if path is None else {
        "path": os.path.abspath(path), "sha256": sam_digest(path), "random": False,
        "files": _stat_signature(path)}
    if jax.process_index() == 0:
      atomic_write(rec_path, json.dumps(rec, indent=1))
    return
  check_sam_weights(workdir, path)


def check_sam_weights(workdir: str, path: str | None) -> None:
  """Raises `SamWeightsChangedError` / `SamWeightsMissingError` unless `path` holds the SAM
  weights the workdir was trained with (a matching size/mtime signature skips re-hashing)."""
  rec_path = os.path.join(os.fspath(workdir), SAM_RECORD)
  if not os.path.isfile(rec_path):
    return  # a workdir from before the record existed
  with open(rec_path) as f:
    rec = json.load(f)
  if rec.get("random"):
    if path is not None:
      raise SamWeightsChangedError(
          f"{workdir} was trained with a random SAM, but model.sam_checkpoint={path!r}; "
          "pass --config.model.sam_checkpoint=None")
    return
  if path is None:
    raise SamWeightsMissingError(
        f"{workdir} was trained with the SAM weights at {rec['path']} (sha256 "
        f"{rec['sha256'][:12]}...); pass --config.model.sam_checkpoint=DIR")
  if not os.path.isdir(path):
    raise SamWeightsMissingError(
        f"converted SAM weights {path!r} (recorded in {rec_path}) do not exist; convert the "
        "same official checkpoint again or pass --config.model.sam_checkpoint=DIR")
  if rec.get("files") == _stat_signature(path):
    return
  digest = sam_digest(path)
  if digest != rec["sha256"]:
    raise SamWeightsChangedError(
        f"SAM weights at {path} (sha256 {digest[:12]}...) are not the ones {workdir} was "
        f"trained with ({rec['path']}, sha256 {rec['sha256'][:12]}...)")


# -- checkpoints ----------------------------------------------------------------------------------


def parse_checkpoint_arg(value: str | int) -> str | int:
  """``best`` / ``latest`` / a step number (``--checkpoint``); raises ValueError."""
  if isinstance(value, int):
    return value
  v = str(value).strip()
  if v in ("best", "latest"):
    return v
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"--checkpoint {value!r}: expected best, latest or a step number") from None


def check_checkpoint_arg(workdir: str, which: str | int) -> None:
  """Raises `NoCheckpointError` when the segmentation stage of `workdir` has no checkpoint,
  or `which` is a step it has none of (listing the steps it has): checked before anything
  heavy is built."""
  seg = stage_dir(workdir, "segmentation")
  steps = sorted(int(d) for d in os.listdir(seg) if d.isdigit()) if os.path.isdir(seg) else []
  if not steps:
    raise NoCheckpointError(
        f"no segmentation-stage checkpoint in {seg}: train first with `python -m "
        f"fusionsam_jax.train --config CONFIG --workdir {workdir}`")
  if isinstance(which, str):
    return
  if which not in steps:
    have = ", ".join(map(str, steps)) if steps else "none"
    raise NoCheckpointError(f"--checkpoint {which}: {seg} has no checkpoint of step {which} "
                            f"(it has: {have}; or use best / latest)")


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.fspath(workdir), "checkpoints", stage)


def stage_checkpointer(config, workdir: str, stage: str, *, best_k: int = 0,
                       fingerprint: str | None = None, read_only: bool = False,
                       say=None) -> checkpointing.StageCheckpointer:
  """`read_only`: for readers (evaluate, predict), which may run next to a training run and
  leave its saves in progress alone."""
  t = config.train
  return checkpointing.StageCheckpointer(
      stage_dir(workdir, stage), save_interval_steps=int(t.checkpoint_every),
      keep_latest=int(t.keep_latest), best_k=best_k, best_metric="val_miou", stage=stage,
      config_fingerprint=fingerprint, read_only=read_only, say=say)


def final_step(ckpt: checkpointing.StageCheckpointer) -> int | None:
  """The step a complete stage ended at (its marker), else its latest checkpoint's."""
  try:
    info = ckpt.stage_done_info() or {}
  except (OSError, ValueError):
    info = {}
  step = info.get("step")
  return int(step) if isinstance(step, int) else ckpt.latest_step()


def dir_bytes(path: str) -> int:
  """Bytes of every file under `path` (0 if absent)."""
  total = 0
  for root, _, names in os.walk(path):
    for n in names:
      p = os.path.join(root, n)
      if not os.path.islink(p):
        total += os.path.getsize(p)
  return total
