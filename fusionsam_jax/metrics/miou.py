"""Semantic-segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy.

Convention (RTFNet, CMX, MRFS, SegMiF and the official FusionSAM evaluation): a single
confusion matrix is accumulated over the whole test set at full label resolution; pixels
whose label is ``ignore_index`` (255) are skipped; the unlabeled/background class is an
ordinary class; IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes that occur in
the prediction or the ground truth (``nan`` for the others, skipped by the mean).

Matrix layout: ``cm[t, p]`` counts pixels whose ground truth is ``t`` and whose prediction
is ``p`` (rows = truth, columns = prediction, as ``sklearn.metrics.confusion_matrix``).

Two ways of filling it:

* :class:`ConfusionMatrix` — numpy, int64, on the host; validates its inputs and raises.
* :func:`confusion_matrix` — jittable JAX, int32, for on-device accumulation per batch;
  add its result to a :class:`ConfusionMatrix` with :meth:`ConfusionMatrix.add`.

CLI::

    python -m fusionsam_jax.metrics.miou --pred_dir P --gt_dir G --num_classes N \
        [--ignore_index 255] [--class_names a,b,c] [--json out.json] \
        [--split_list test.txt] [--dataset mfnet|fmb] [--markdown]

``--pred_dir`` may be a ``predict`` output folder (its ``labels/`` is read).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fusionsam_jax.data.datasets import paper_table
from fusionsam_jax.data.datasets import read_split_list


__all__ = [
    "ConfusionMatrix",
    "confusion_matrix",
    "format_iou_table",
    "format_paper_table",
    "paper_table_rows",
    "prediction_dir",
    "load_label_png",
    "matched_png_names",
    "read_name_list",
    "evaluate_label_dirs",
    "main",
]


# ----------------------------------------------------------------------------- numpy


class ConfusionMatrix:
  """Confusion-matrix accumulator over a whole test set (numpy, int64).

  Args:
    num_classes: number of classes C; valid class ids are ``0 .. C-1``.
    ignore_index: label value that marks pixels to skip (default 255). ``None`` disables it.

  ``update`` checks its inputs and raises ``ValueError`` on any pixel that is counted and
  whose label or prediction is outside ``[0, C)``; a wrong ``num_classes`` is then caught
  instead of silently dropping pixels.
  """

  def __init__(self, num_classes: int, ignore_index: int | None = 255):
    if int(num_classes) < 1:
      raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    self.num_classes = int(num_classes)
    self.ignore_index = None if ignore_index is None else int(ignore_index)
    self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
    self.num_updates = 0

  @classmethod
  def from_matrix(cls, matrix, ignore_index: int | None = 255) -> "ConfusionMatrix":
    """An accumulator holding the counts of a ``(C, C)`` matrix (e.g. an evaluation
    JSON's ``confusion_matrix``)."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
      raise ValueError(f"confusion matrix must be square (C, C), got shape {m.shape}")
    cm = cls(m.shape[0], ignore_index)
    cm.add(m)
    return cm

  def reset(self) -> None:
    self.matrix[...] = 0
    self.num_updates = 0

  def update(self, pred, label, valid=None) -> None:
    """Adds one prediction/label pair (any equal shapes, e.g. ``(H, W)`` or ``(B, H, W)``).

    Args:
      pred: integer class ids.
      label: integer class ids; ``ignore_index`` pixels are skipped.
      valid: optional boolean mask of the same shape; ``False`` pixels are skipped.
    """
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
      raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    for name, a in (("prediction", pred), ("label", label)):
      if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    shape = label.shape
    pred = pred.astype(np.int64).ravel()
    label = label.astype(np.int64).ravel()
    keep = np.ones(label.shape, bool)
    if self.ignore_index is not None:
      keep &= label != self.ignore_index
    if valid is not None:
      valid = np.asarray(valid)
      if valid.shape != shape:
        raise ValueError(f"valid mask shape {valid.shape} != label shape {shape}")
      keep &= valid.astype(bool).ravel()
    pred = pred[keep]
    label = label[keep]
    c = self.num_classes
    for name, a in (("label", label), ("prediction", pred)):
      bad = (a < 0) | (a >= c)
      if bad.any():
        vals = np.unique(a[bad])[:8].tolist()
        raise ValueError(
            f"{name} holds values {vals} outside [0, {c}) at counted pixels "
            f"(ignore_index={self.ignore_index}); wrong num_classes?")
    self.matrix += np.bincount(label * c + pred, minlength=c * c).reshape(c, c)
    self.num_updates += 1

  def add(self, matrix) -> None:
    """Adds a precomputed ``(C, C)`` matrix, e.g. from :func:`confusion_matrix`."""
    m = np.asarray(matrix)
    if m.shape != self.matrix.shape:
      raise ValueError(f"matrix shape {m.shape} != {self.matrix.shape}")
    if (m < 0).any():
      raise ValueError("confusion matrix counts must be non-negative")
    self.matrix += m.astype(np.int64)
    self.num_updates += 1

  def merge(self, other: "ConfusionMatrix") -> None:
    """Adds the counts of another accumulator (same C)."""
    self.add(other.matrix)

  # -- derived quantities

  def iou(self) -> np.ndarray:
    """Per-class IoU, float64 ``(C,)``; ``nan`` where TP + FP + FN == 0."""
    tp = np.diag(self.matrix).astype(np.float64)
    denom = self.matrix.sum(0) + self.matrix.sum(1) - np.diag(self.matrix)
    out = np.full(self.num_classes, np.nan)
    np.divide(tp, denom, out=out, where=denom > 0)
    return out

  def miou(self) -> float:
    """Mean IoU over classes present in prediction or truth (nan-mean); nan if none."""
    iou = self.iou()
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan

  def pixel_accuracy(self) -> float:
    """Overall pixel accuracy (trace / total); nan when nothing was counted."""
    total = self.matrix.sum()
    return float(np.trace(self.matrix) / total) if total > 0 else math.nan

  def class_accuracy(self) -> np.ndarray:
    """Per-class recall TP / (TP + FN); nan for classes absent from the truth."""
    gt = self.matrix.sum(1).astype(np.float64)
    out = np.full(self.num_classes, np.nan)
    np.divide(np.diag(self.matrix).astype(np.float64), gt, out=out, where=gt > 0)
    return out

  def mean_class_accuracy(self) -> float:
    """mAcc: mean per-class recall over the classes present in the truth (nan-mean), as
    ``sklearn.metrics.balanced_accuracy_score``."""
    acc = self.class_accuracy()
    return float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan

  def summary(self, class_names: Sequence[str] | None = None) -> dict:
    """JSON-ready dict (nan written as ``None``)."""
    names = class_names_for(class_names, self.num_classes)
    iou = self.iou()
    return {
        "num_classes": self.num_classes,
        "ignore_index": self.ignore_index,
        "class_names": names,
        "iou": {n: _nan_to_none(v) for n, v in zip(names, iou)},
        "miou": _nan_to_none(self.miou()),
        "pixel_accuracy": _nan_to_none(self.pixel_accuracy()),
        "mean_class_accuracy": _nan_to_none(self.mean_class_accuracy()),
        "num_pixels": int(self.matrix.sum()),
        "confusion_matrix": self.matrix.tolist(),
    }


def _nan_to_none(v):
  v = float(v)
  return None if math.isnan(v) else v


def class_names_for(class_names, num_classes):
  if class_names is None:
    return [str(i) for i in range(num_classes)]
  names = [str(n) for n in class_names]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names given for {num_classes} classes")
  return names


# ----------------------------------------------------------------------------- JAX


def confusion_matrix(pred, label, num_classes: int, ignore_index: int | None = 255, valid=None):
  """Confusion matrix of one batch, jittable (``num_classes`` static); ``(C, C)`` int32.

  ``cm[t, p]`` counts pixels with truth ``t`` and prediction ``p``. Pixels are skipped when
  the label equals ``ignore_index``, when ``valid`` (optional, same shape) is False, or
  when the label or prediction lies outside ``[0, C)`` (JAX cannot raise on data; use the
  numpy :class:`ConfusionMatrix` when inputs need checking). Implemented as one
  ``segment_sum`` over flat ``label * C + pred`` indices, so memory is O(pixels), not
  O(pixels * C). int32 counts: accumulate batches on the host in int64
  (:meth:`ConfusionMatrix.add`) for whole test sets.
  """

  c = int(num_classes)
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(-1)
  if pred.shape != label.shape:
    raise ValueError(f"prediction size {pred.shape} != label size {label.shape}")
  keep = (label >= 0) & (label < c) & (pred >= 0) & (pred < c)
  if ignore_index is not None:
    keep &= label != ignore_index
  if valid is not None:
    keep &= jnp.asarray(valid).astype(bool).reshape(-1)
  idx = jnp.where(keep, label * c + pred, 0)
  counts = jax.ops.segment_sum(keep.astype(jnp.int32), idx, num_segments=c * c,
                               indices_are_sorted=False)
  return counts.reshape(c, c)


# ----------------------------------------------------------------------------- table


def format_iou_table(
    iou,
    class_names: Sequence[str] | None = None,
    *,
    miou: float | None = None,
    method: str = "Ours",
    columns: Sequence[str] | None = None,
    percent: bool = True,
    decimals: int = 1,
    markdown: bool = False,
) -> str:
  """Formats per-class IoU in the layout of the paper's Tables 1/2.

  Header ``Method  <class> ... mIoU(%)``, then one row per method.

  Args:
    iou: per-class IoU ``(C,)`` (fractions), or a mapping ``method -> (C,)`` for several rows.
    class_names: names of the C classes (default ``"0" .. "C-1"``).
    miou: the mIoU to print; default the nan-mean of each row's ``iou`` over *all* classes
      (also when ``columns`` shows only some of them, as Table 2 does).
    method: row label when ``iou`` is a single array.
    columns: class names to show, in order (default all classes).
    percent: print values x 100 (the paper's convention).
    decimals: digits after the point.
    markdown: emit a Markdown table instead of aligned plain text.

  nan (class absent from prediction and truth) prints as ``-``.
  """
  rows: Mapping[str, np.ndarray]
  if isinstance(iou, Mapping):
    rows = {str(k): np.asarray(v, np.float64) for k, v in iou.items()}
    if miou is not None and len(rows) > 1:
      raise ValueError("miou= is only accepted with a single row")
  else:
    rows = {method: np.asarray(iou, np.float64)}
  sizes = {v.shape for v in rows.values()}
  if len(sizes) != 1 or len(next(iter(sizes))) != 1:
    raise ValueError(f"every row must be a 1-D per-class IoU of one length, got {sizes}")
  num_classes = next(iter(sizes))[0]
  names = class_names_for(class_names, num_classes)
  shown = list(names) if columns is None else [str(c) for c in columns]
  missing = [c for c in shown if c not in names]
  if missing:
    raise ValueError(f"columns {missing} are not among the class names {names}")
  col_idx = [names.index(c) for c in shown]
  scale = 100.0 if percent else 1.0

  def fmt(v):
    return "-" if v is None or math.isnan(v) else f"{v * scale:.{decimals}f}"

  header = ["Method"] + shown + ["mIoU(%)" if percent else "mIoU"]
  body = []
  for name, vals in rows.items():
    m = miou if miou is not None else (
        float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan)
    body.append([name] + [fmt(vals[i]) for i in col_idx] + [fmt(m)])

  return _render_table(header, body, markdown)


def _render_table(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> str:
  """Aligned plain text (first column left, the others right) or a Markdown table."""
  if markdown:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  out = []
  for r in [header] + body:
    cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))]
    out.append("  ".join(cells).rstrip())
  return "\n".join(out)


def paper_table_rows(
    summary: Mapping,
    *,
    dataset: str | None = None,
    method: str = "FusionSAM (this run)",
    paper_row: bool = True,
    all_classes: bool = False,
    decimals: int = 1,
) -> tuple[list[str], list[list[str]]]:
  """Header and rows of :func:`format_paper_table` (cells as strings), e.g. for HTML."""

  cm = ConfusionMatrix.from_matrix(summary["confusion_matrix"])
  names = class_names_for(summary.get("class_names"), cm.num_classes)
  name = dataset if dataset is not None else summary.get("dataset")
  table = None if name is None else paper_table(str(name))
  if table is not None and any(c not in names for c, _ in table.columns):
    table = None  # class names of another dataset: not this paper table
  if table is None or all_classes:
    cols = [(n, n) for n in names]
  else:
    cols = list(table.columns)
  iou = cm.iou()
  idx = {n: i for i, n in enumerate(names)}

  def fmt(v):
    return "-" if v is None or math.isnan(v) else f"{v * 100:.{decimals}f}"

  header = ["Method"] + [h for _, h in cols] + ["mIoU(%)", "mAcc(%)", "PixAcc(%)"]
  body = [[method] + [fmt(iou[idx[c]]) for c, _ in cols]
          + [fmt(cm.miou()), fmt(cm.mean_class_accuracy()), fmt(cm.pixel_accuracy())]]
  show_paper = (paper_row and table is not None and not summary.get("generated", False)
                and summary.get("split", table.split) == table.split)
  if show_paper:
    ref = table.iou_by_class()
    body.append([f"FusionSAM (paper, {table.table})"]
                + [fmt(ref[c] / 100) if c in ref else "-" for c, _ in cols]
                + [fmt(table.miou / 100), "-", "-"])
  return header, body


def format_paper_table(
    summary: Mapping,
    *,
    dataset: str | None = None,
    method: str = "FusionSAM (this run)",
    paper_row: bool = True,
    all_classes: bool = False,
    decimals: int = 1,
    markdown: bool = False,
) -> str:
  """The result of one evaluation in the column set of the paper's Table 1 (MFNet) / 2 (FMB).

  Args:
    summary: an evaluation result (``ConfusionMatrix.summary()``, the evaluate JSON): needs
      ``confusion_matrix`` and ``class_names``; ``dataset``, ``split`` and ``generated`` are
      read when present.
    dataset: dataset whose paper columns to use (default ``summary["dataset"]``). Datasets
      without a paper table (VDT-2048, unknown) show every class.
    method: label of this run's row.
    paper_row: add the paper's FusionSAM row (labelled as the paper's numbers) below; only
      for a real dataset's test split (never for generated scenes, whose classes only
      borrow the names).
    all_classes: show every class instead of the paper's columns.
    decimals: digits after the point (the paper prints 1).
    markdown: a Markdown table instead of aligned text.

  Columns: the paper's classes (with its headers), ``mIoU(%)`` over *all* classes (as the
  paper's), ``mAcc(%)`` (mean class accuracy) and ``PixAcc(%)``. nan prints as ``-``.
  """
  header, body = paper_table_rows(summary, dataset=dataset, method=method,
                                  paper_row=paper_row, all_classes=all_classes,
                                  decimals=decimals)
  return _render_table(header, body, markdown)


# ----------------------------------------------------------------------------- files


def load_label_png(path, palette: Sequence[Sequence[int]] | None = None,
                   palette_indices: bool = False) -> np.ndarray:
  """Reads a single-channel label PNG (modes L, P, I;16, I, 1) as an int64 ``(H, W)`` array.

  Palette ("P") images: their indices are class ids when the palette says so -- it is a grey
  ramp (index i shows as (i, i, i)), it is `palette` (the dataset's: index i shows class i's
  colour), it does not cover the indices used, or `palette_indices` is set. Otherwise, when
  every colour used is one of `palette`'s, the colours are mapped to their class ids (a
  colour-coded mask saved as a palette PNG, indices in any order); else ValueError (its
  indices need not be class ids: counted as they are they gave 5.7% for 65.7%). Colour
  images (RGB/RGBA/LA) are refused: colour-coded masks must be mapped to ids first.
  """

  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      mode = im.mode
      if mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raise ValueError(
            f"{path}: label image has mode {mode!r}; expected a single-channel "
            "class-id PNG (L, P or 16-bit)")
      arr = np.asarray(im)
      pal = im.getpalette() if mode == "P" else None
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such label file") from None
  except OSError as e:  # unreadable / not an image
    raise ValueError(f"{path}: cannot read as an image ({e})") from None
  arr = arr.astype(np.int64)
  if mode == "P" and pal and not palette_indices:
    arr = _palette_ids(arr, np.asarray(pal, np.int64).reshape(-1, 3), palette, path)
  return arr


def _palette_ids(idx: np.ndarray, pal: np.ndarray, palette, path) -> np.ndarray:
  """Class ids of a palette image (`load_label_png`'s rule)."""
  used = np.unique(idx)
  if used.max(initial=0) >= len(pal):
    return idx                                # the palette does not describe these indices
  colours = pal[used]
  if np.array_equal(colours, np.repeat(used[:, None], 3, 1)):
    return idx                                # grey ramp
  ref = None if palette is None else np.asarray(palette, np.int64).reshape(-1, 3)
  if ref is not None:
    inside = used < len(ref)                  # beyond: e.g. the ignore index, kept as it is
    if inside.any() and np.array_equal(colours[inside], ref[used[inside]]):
      return idx                              # the dataset's own palette
    lut = {tuple(c): k for k, c in enumerate(ref.tolist())}
    ids = [lut.get(tuple(c)) for c in colours.tolist()]
    if all(i is not None for i in ids):
      table = np.zeros(len(pal), np.int64)
      table[used] = ids
      return table[idx]                       # colours mapped to class ids
  shown = ", ".join(f"{int(u)}->{tuple(int(v) for v in c)}" for u, c in zip(used[:4],
                                                                             colours[:4]))
  raise ValueError(
      f"{path}: palette PNG whose palette ({shown}{', ...' if len(used) > 4 else ''}) is "
      "neither a grey ramp nor the dataset's palette, so its indices need not be class ids; "
      "save class ids as a single-channel PNG, pass --dataset to map the dataset's colours, "
      "or --palette_indices to count the indices as class ids")


def _png_names(d) -> list[str]:
  d = os.fspath(d)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"{d}: not a directory")
  # Hidden files are skipped: a killed writer's temporary file (`fsutil.atomic_file`,
  # ``.tmp-<pid>-*.png``) is no prediction.
  return sorted(f for f in os.listdir(d) if f.lower().endswith(".png")
                and not f.startswith(".") and os.path.isfile(os.path.join(d, f)))


def read_name_list(path) -> list[str]:
  """Names of a split list (one per line, e.g. MFNet's ``test.txt``) as ``<name>.png``;
  read as ``prepare`` reads it (`data.datasets.read_split_list`: UTF-8, no empty or repeated
  entry, no entry reaching out of the folder with ``..`` or an absolute path)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such split list")
  return sorted(f"{n}.png" for n in read_split_list(path))


def matched_png_names(pred_dir, gt_dir, names: Sequence[str] | None = None) -> list[str]:
  """Filenames present in both folders; raises naming the first missing/extra file.

  `names` (e.g. from :func:`read_name_list`) restricts the ground truth to those files
  (a split of a folder that holds every split, as MFNet's ``labels/``); each must exist.
  """
  preds, gts = _png_names(pred_dir), _png_names(gt_dir)
  if names is not None:
    absent = sorted(set(names) - set(gts))
    if absent:
      raise FileNotFoundError(f"{os.path.join(os.fspath(gt_dir), absent[0])}: listed "
                              f"ground truth does not exist ({len(absent)} missing)")
    gts = sorted(set(names))
  if not gts:
    raise FileNotFoundError(f"{gt_dir}: no .png files")
  missing = sorted(set(gts) - set(preds))
  extra = sorted(set(preds) - set(gts))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise FileNotFoundError(
        f"{os.path.join(os.fspath(pred_dir), missing[0])}: prediction missing for "
        f"ground truth {missing[0]}{more}")
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(
        f"{os.path.join(os.fspath(pred_dir), extra[0])}: prediction has no ground truth "
        f"in {gt_dir}{more}")
  return gts


def prediction_dir(pred_dir, subfolder: str = "labels") -> str:
  """`pred_dir`, or its ``subfolder`` when `pred_dir` is a ``predict`` output folder (it has
  ``subfolder/`` and no PNGs of its own), so that ``--pred_dir OUT`` and
  ``--pred_dir OUT/labels`` both work."""
  d = os.fspath(pred_dir)
  sub = os.path.join(d, subfolder)
  if os.path.isdir(sub) and os.path.isdir(d) and not _png_names(d):
    return sub
  return d


def evaluate_label_dirs(pred_dir, gt_dir, num_classes: int, ignore_index: int | None = 255,
                        names: Sequence[str] | None = None, *,
                        palette: Sequence[Sequence[int]] | None = None,
                        palette_indices: bool = False) -> ConfusionMatrix:
  """Accumulates a :class:`ConfusionMatrix` over PNG label folders matched by filename
  (only `names` of the ground truth when given, see :func:`matched_png_names`). Palette
  PNGs: see :func:`load_label_png` (`palette`: the dataset's, or None).

  Labels are never resized: a size mismatch raises ``ValueError`` naming the file; a value
  outside the class range raises naming the file that holds it (ground truth or prediction).
  """
  cm = ConfusionMatrix(num_classes, ignore_index)
  c = cm.num_classes
  for name in matched_png_names(pred_dir, gt_dir, names):
    pp = os.path.join(os.fspath(pred_dir), name)
    gp = os.path.join(os.fspath(gt_dir), name)
    pred = load_label_png(pp, palette, palette_indices)
    gt = load_label_png(gp, palette, palette_indices)
    if pred.shape != gt.shape:
      raise ValueError(f"{pp}: prediction size {pred.shape[1]}x{pred.shape[0]} (WxH) "
                       f"!= ground truth {gp} size {gt.shape[1]}x{gt.shape[0]}; "
                       "labels are not resized")
    counted = gt != ignore_index if ignore_index is not None else np.ones(gt.shape, bool)
    for what, path, a in (("ground truth", gp, gt), ("prediction", pp, pred)):
      bad = counted & ((a < 0) | (a >= c))
      if bad.any():
        vals = np.unique(a[bad])[:8].tolist()
        raise ValueError(f"{path}: {what} holds values {vals} outside [0, {c}) at counted "
                         f"pixels (ignore_index={ignore_index}); wrong num_classes?")
    cm.update(pred, gt)
  return cm


if __name__ == "__main__":   # python -m fusionsam_jax.metrics.miou
  from fusionsam_jax.cli import driver, miou
  driver.main(miou)
