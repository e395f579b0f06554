"""Metric logging: ``metrics.jsonl`` and TensorBoard (tensorboardX), process 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from fusionsam_jax.fsutil import atomic_write

log = logging.getLogger(__name__)


def _is_primary() -> bool:
  return jax.process_index() == 0


def _to_float(v: Any) -> float | None:
  try:
    a = np.asarray(v)
  except Exception:  # noqa: BLE001
    return None
  if a.size != 1 or a.dtype.kind not in "biuf":
    return None
  return float(a.reshape(()))


class MetricWriter:
  """Appends scalars to ``<logdir>/metrics.jsonl`` and writes them to TensorBoard.

  Each JSON line is ``{"step": int, "time": float, "split": str, <name>: float, ...}``.
  Non-finite values are written as strings ("nan", "inf") so that the file stays JSON.
  With `tensorboard` True a `tensorboardX.SummaryWriter` writes event files to `logdir`
  (or ``logdir/tb_subdir``), tag ``<split>/<name>``. `purge_step` drops TensorBoard
  events at or after that step (pass the first step after the restored one on resume).
  """

  def __init__(self, logdir: str | os.PathLike, *, tensorboard: bool = True,
               purge_step: int | None = None, jsonl_name: str = "metrics.jsonl",
               tb_subdir: str | None = None):
    self.logdir = os.fspath(logdir)
    self.primary = _is_primary()
    self._tb = None
    self.jsonl_path = os.path.join(self.logdir, jsonl_name)
    if not self.primary:
      return
    os.makedirs(self.logdir, exist_ok=True)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
      except ImportError:
        log.warning("tensorboardX is not installed; TensorBoard logging is off")
      else:
        tb_dir = os.path.join(self.logdir, tb_subdir) if tb_subdir else self.logdir
        self._tb = SummaryWriter(logdir=tb_dir, purge_step=purge_step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> None:
    if not self.primary:
      return
    row: dict[str, Any] = {"step": int(step), "time": time.time(), "split": split}
    for k, v in scalars.items():
      f = _to_float(v)
      if f is None:
        continue
      row[k] = f if math.isfinite(f) else str(f)
      # One-point timing events (compile times, first step) stay in metrics.jsonl only:
      # in TensorBoard they would be cards of one point each, sorted before the losses.
      if self._tb is not None and not split.endswith("/event"):
        self._tb.add_scalar(f"{split}/{k}", f, int(step))
    with open(self.jsonl_path, "a") as fh:
      fh.write(json.dumps(row) + "\n")

  def drop_rows_after(self, step: int, split_prefix: str) -> int:
    """Removes the ``metrics.jsonl`` rows of splits starting with `split_prefix` logged
    after `step` (and torn lines): a run resumed from checkpoint `step` logs those steps
    again. Rewrites the file atomically; returns how many rows went."""
    if not self.primary or not os.path.isfile(self.jsonl_path):
      return 0
    kept, dropped = [], 0
    with open(self.jsonl_path) as fh:
      for line in fh:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          dropped += line.strip() != ""
          continue
        if (isinstance(row, dict) and str(row.get("split", "")).startswith(split_prefix)
            and int(row.get("step", 0)) > step):
          dropped += 1
          continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
      atomic_write(self.jsonl_path, "".join(kept))
    return dropped

  def write_images(self, step: int, images: Mapping[str, Any], split: str = "train") -> None:
    """Images: HWC or NHWC arrays, uint8 or float in [0, 1]; 1 or 3 channels."""
    if not self.primary or self._tb is None:
      return
    for name, img in images.items():
      a = np.asarray(img)
      if a.ndim == 2:
        a = a[..., None]
      if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32), 0.0, 1.0)
      fmt = "NHWC" if a.ndim == 4 else "HWC"
      if fmt == "NHWC":
        self._tb.add_images(f"{split}/{name}", a, int(step), dataformats=fmt)
      else:
        self._tb.add_image(f"{split}/{name}", a, int(step), dataformats=fmt)

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.primary and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a ``metrics.jsonl`` (skipping a torn last line from a killed run)."""
  rows = []
  with open(path) as fh:
    for line in fh:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def progress_bar(iterable=None, **kwargs):
  """A tqdm bar on an interactive stderr; elsewhere (a log file, a pipe, CI) `iterable`
  itself, or with none a bar that draws nothing: logs get one line per eval, not bars."""
  if not sys.stderr.isatty():
    return iterable if iterable is not None else tqdm(disable=True, **kwargs)
  return tqdm(iterable, **kwargs) if iterable is not None else tqdm(**kwargs)
