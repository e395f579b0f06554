"""Run guards: non-finite losses and workdir/config consistency."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from fusionsam_jax.fsutil import atomic_write

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


# -- non-finite losses ---------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
  """A loss term (or gradient norm) became NaN/Inf.

  Attributes: step (the update number whose metrics were non-finite), term (metric name),
  value, last_good_checkpoint (step of the newest checkpoint saved before, or None).
  """

  def __init__(self, step: int, term: str, value: float,
               last_good_checkpoint: int | None = None, all_terms: Sequence[str] = ()):
    self.step, self.term, self.value = int(step), term, value
    self.last_good_checkpoint = last_good_checkpoint
    self.all_terms = tuple(all_terms)
    others = [t for t in self.all_terms if t != term]
    msg = (f"non-finite loss term '{term}' = {value} at step {self.step}"
           + (f" (also non-finite: {others})" if others else ""))
    if last_good_checkpoint is not None:
      msg += f"; the last good checkpoint is step {last_good_checkpoint}"
    else:
      msg += "; no checkpoint was saved before it"
    super().__init__(msg)


_TOTALS = ("loss", "grad_norm", "d_loss", "d_grad_norm")


def nonfinite_terms(metrics: Mapping[str, Any]) -> list[tuple[str, float]]:
  """[(name, value)] for float metrics that are NaN or +/-Inf; loss terms before the
  totals (``loss``, ``grad_norm``, ...) so that the first names the cause."""
  bad = []
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.dtype.kind not in "fc":
      continue
    if not np.all(np.isfinite(a)):
      bad.append((k, float(a.ravel()[~np.isfinite(a.ravel())][0].real)))
  # Name a component term before the totals it poisons.
  bad.sort(key=lambda kv: (kv[0] in _TOTALS, kv[0]))
  return bad


def check_finite(metrics: Mapping[str, Any], step: int,
                 last_good_checkpoint: int | None = None) -> None:
  """Raises `NonFiniteLossError` naming `step` and the first offending term."""
  bad = nonfinite_terms(metrics)
  if bad:
    term, value = bad[0]
    raise NonFiniteLossError(step, term, value, last_good_checkpoint, [k for k, _ in bad])


# -- workdir config guard ------------------------------------------------------------
class ConfigMismatchError(ValueError):
  """The workdir was created by a run with a different config."""


def config_to_dict(config: Any) -> Any:
  """A JSON-able plain structure for a dict / ml_collections ConfigDict / dataclass."""
  if hasattr(config, "to_dict") and callable(config.to_dict):
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  if isinstance(config, Mapping):
    return {str(k): config_to_dict(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [config_to_dict(v) for v in config]
  if isinstance(config, (str, int, bool)) or config is None:
    return config
  if isinstance(config, float):
    return config if math.isfinite(config) else str(config)
  if isinstance(config, np.generic):
    return config_to_dict(config.item())
  return repr(config)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def with_added(flat: dict[str, Any], added: Mapping[str, Any] | None) -> dict[str, Any]:
  """A flattened config with the keys of `added` it lacks set to their values. Applied to
  both sides of a comparison: a stored record made before a key existed, and a config that
  never sets it (e.g. a variant replacing the sub-dict that holds it), both mean the
  behaviour the key's `added` value names."""
  return {**dict(added or {}), **flat}


def _ignored(key: str, pattern: str) -> bool:
  """Whether dotted `key` is `pattern` or below it; a ``*`` part of `pattern` matches any
  one part of `key`."""
  if "*" not in pattern:
    return key == pattern or key.startswith(pattern + ".")
  kp, pp = key.split("."), pattern.split(".")
  return len(kp) >= len(pp) and all(p in ("*", k) for k, p in zip(kp, pp))


def _drop(flat: dict[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
  ignore = tuple(ignore)
  return {k: v for k, v in flat.items() if not any(_ignored(k, i) for i in ignore)}


def config_diff(old: Any, new: Any, ignore: Iterable[str] = (),
                added: Mapping[str, Any] | None = None) -> list[str]:
  """``"key: old -> new"`` for each dotted key whose value differs between two configs
  (dicts or ConfigDicts), outside `ignore`, keys of `added` filled in on both sides."""
  ignore = tuple(ignore)
  a, b = (_drop(with_added(_flatten(config_to_dict(c)), added), ignore) for c in (old, new))
  return [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


def config_fingerprint(config: Any, ignore: Iterable[str] = ()) -> str:
  """sha256 (hex, 16 chars) of the canonical JSON of `config`, minus `ignore`d dotted keys."""
  flat = _drop(_flatten(config_to_dict(config)), ignore)
  blob = json.dumps(flat, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_workdir_config(workdir: str | os.PathLike, config: Any, *,
                         ignore: Iterable[str] = (), allow_change: bool = False,
                         added: Mapping[str, Any] | None = None) -> str:
  """Stores the config in ``workdir/config.json`` on first use; checks it afterwards.

  A later run whose config differs (outside the dotted keys in `ignore`, e.g.
  ``("train.num_steps",)``) raises `ConfigMismatchError` listing the differing keys, unless
  `allow_change` is set: then the change is logged, the old file is kept as
  ``config.<unix time>.json`` and the new config is stored. `added`: dotted keys introduced
  after a workdir may have been made, with the value that reproduces the old behaviour; a
  stored config without such a key reads as having that value (and the record gains it).
  Returns the fingerprint. (`compare_workdir_config` + `store_workdir_config`, for a caller
  that has more to check before the new config may replace the old one.)

  Only process 0 writes.
  """
  fp, diff = compare_workdir_config(workdir, config, ignore=ignore, allow_change=allow_change,
                                    added=added)
  if diff != []:
    store_workdir_config(workdir, config, ignore=ignore, added=added)
  return fp


def compare_workdir_config(workdir: str | os.PathLike, config: Any, *,
                           ignore: Iterable[str] = (), allow_change: bool = False,
                           added: Mapping[str, Any] | None = None
                           ) -> tuple[str, list[str] | None]:
  """Compares `config` with ``workdir/config.json``; writes nothing.

  Returns (fingerprint, differences): differences is None when the workdir has no config
  yet or its record only lacks keys of `added` (at their old-behaviour values: the record
  should be rewritten), [] when the stored one is the same (outside `ignore`), else the
  differing keys as ``"key: old -> new"`` (only with `allow_change`: otherwise
  `ConfigMismatchError`)."""
  ignore = tuple(ignore)
  new = config_to_dict(config)
  fp = config_fingerprint(new, ignore)
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.exists(path):
    return fp, None
  with open(path) as f:
    try:
      old = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigMismatchError(f"{path} is not valid JSON ({e}); remove it or use "
                                "another workdir") from e
  old_cfg = old.get("config", {}) if isinstance(old, dict) else {}
  if config_fingerprint(old_cfg, ignore) == fp:
    return fp, []
  diff = config_diff(old_cfg, new, ignore, added)
  if not diff:
    return fp, None
  shown = "; ".join(diff[:20]) + (f"; ... ({len(diff)} in all)" if len(diff) > 20 else "")
  if not allow_change:
    raise ConfigMismatchError(
        f"workdir {workdir} was created with a different config ({path}): {shown}. "
        "Use a new workdir, or allow the change explicitly (allow_config_change).")
  return fp, diff


def _stored_differs(path: str, new: dict, ignore: tuple, added) -> bool:
  try:
    with open(path) as f:
      old = json.load(f).get("config", {})
  except (OSError, ValueError, AttributeError):
    return True
  return bool(config_diff(old, new, ignore, added))


def store_workdir_config(workdir: str | os.PathLike, config: Any, *,
                         ignore: Iterable[str] = (),
                         added: Mapping[str, Any] | None = None) -> None:
  """Writes ``workdir/config.json`` (atomically); an existing one that differs (beyond keys
  of `added` at their old-behaviour values) is kept as ``config.<unix time>.json``. Only
  process 0 writes."""

  ignore = tuple(ignore)
  new = config_to_dict(config)
  record = {"fingerprint": config_fingerprint(new, ignore), "ignore": list(ignore),
            "config": new}
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if jax.process_index() != 0:
    return
  if os.path.exists(path) and _stored_differs(path, new, ignore, added):
    log.warning("config of workdir %s changed (allowed); the old one is kept", workdir)
    # A copy, not a move: a run killed here still has a config.json.
    shutil.copy2(path, os.path.join(os.fspath(workdir), f"config.{int(time.time())}.json"))
  atomic_write(path, json.dumps(record, indent=2, sort_keys=True))
