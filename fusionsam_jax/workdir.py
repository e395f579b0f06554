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

import hashlib
import json
import os

import jax

from fusionsam_jax import config_lib
from fusionsam_jax.errors import SamWeightsChangedError, SamWeightsMissingError, SetupError
from fusionsam_jax.training import checkpointing, guards

#: Config keys that may change between runs in one workdir: durations, cadences, evaluation
#: settings, where the data and the (identical, sha256-checked) SAM weights are.
MUTABLE_CONFIG_KEYS = (
    *(f"train.stages.{s}.num_steps" for s in config_lib.STAGE_NAMES),
    *(f"train.stages.{s}.num_epochs" for s in config_lib.STAGE_NAMES),
    "train.log_every", "train.image_every", "train.worker_count", "train.checkpoint_every",
    "train.eval_every", "train.eval_every_epochs", "train.keep_latest", "train.best_k", "eval",
    "data_dir", "model.sam_checkpoint", "model.sam2_checkpoint",
)
#: Config keys added after workdirs were made, with the value a workdir without them ran with.
ADDED_CONFIG_KEYS = {"model.backbone": "sam", "model.sam2_checkpoint": None}
SAM_RECORD = "sam_weights.json"
CONFIG_FILE = guards.CONFIG_FILE


def check_config(workdir: str, config, *, allow_change: bool = False) -> str:
  """Stores the config on first use, refuses a different one later (`ConfigMismatchError`,
  listing the differences); returns its fingerprint."""
  return guards.check_workdir_config(workdir, config, ignore=MUTABLE_CONFIG_KEYS,
                                     allow_change=allow_change, added=ADDED_CONFIG_KEYS)


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
  a = guards._drop(guards.with_added(guards._flatten(stored), ADDED_CONFIG_KEYS),
                  MUTABLE_CONFIG_KEYS)
  b = guards._drop(guards._flatten(guards.config_to_dict(config)), MUTABLE_CONFIG_KEYS)
  diff = [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
  if diff:
    raise guards.ConfigMismatchError(
        f"workdir {workdir} was trained with a different config ({path}): "
        + "; ".join(diff[:20]) + ". Pass the config it was trained with (or none: the "
        "stored one is used).")


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
      checkpointing.atomic_write_text(rec_path, json.dumps(rec, indent=1))
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


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.fspath(workdir), "checkpoints", stage)


def stage_checkpointer(config, workdir: str, stage: str, *, best_k: int = 0,
                       fingerprint: str | None = None) -> checkpointing.StageCheckpointer:
  t = config.train
  return checkpointing.StageCheckpointer(
      stage_dir(workdir, stage), save_interval_steps=int(t.checkpoint_every),
      keep_latest=int(t.keep_latest), best_k=best_k, best_metric="val_miou", stage=stage,
      config_fingerprint=fingerprint)


def dir_bytes(path: str) -> int:
  """Bytes of every file under `path` (0 if absent)."""
  total = 0
  for root, _, names in os.walk(path):
    for n in names:
      p = os.path.join(root, n)
      if not os.path.islink(p):
        total += os.path.getsize(p)
  return total
