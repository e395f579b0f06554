r"""The visual evaluation report: figures and one self-contained ``report.html``.

    from fusionsam_jax.evaluators.report import write_report
    paths = write_report("runs/mfnet/report_test_best", result=summary,
                         metrics_jsonl="runs/mfnet/metrics.jsonl", samples=samples,
                         palette=info.palette)

``result`` is an evaluation result (the JSON ``evaluate`` writes: ``confusion_matrix``,
``class_names``, ``dataset``, ``split``, ...). The report holds

* ``confusion_matrix.png``: the confusion matrix, each row (ground-truth class) normalised
  to sum to 1 (row = truth, column = prediction);
* ``iou.png``: per-class IoU, with the paper's FusionSAM row (Table 1 MFNet / Table 2 FMB)
  drawn beside it for a real dataset's test split, labelled as the paper's numbers;
* ``samples.png``: a qualitative grid, one row per sample: each input modality, the fused
  image, ground truth, prediction and an error map;
* ``curves.png``: training loss per stage and val mIoU from ``metrics.jsonl``;
* ``report.html``: all of them (embedded as base64 ``data:`` URIs, so the file can be mailed
  or opened anywhere) with the table of the paper's columns plus mIoU / mAcc and the table of
  every class.

``python -m fusionsam_jax.evaluate`` writes it next to its JSON. To re-draw it from an
existing JSON (no re-evaluation; e.g. after training, which evaluates the best checkpoint)::

    python -m fusionsam_jax.evaluators.report --workdir runs/demo [--result eval_test_best.json]

Figures are drawn with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from fusionsam_jax.data.datasets import get as get_info, paper_table
from fusionsam_jax.data.datasets.base import palette_lut
from fusionsam_jax.data.spec import ensure_data
from fusionsam_jax.fsutil import atomic_file, atomic_write
from fusionsam_jax.metrics.miou import ConfusionMatrix, paper_table_rows

__all__ = ["write_report", "select_samples", "paper_row_for", "read_curves", "error_map",
           "ReportError"]

#: Error-map colours (Okabe-Ito, told apart with any colour vision): correct blue, wrong
#: orange, ignored (label 255) grey.
ERROR_COLORS = {"correct": (0, 114, 178), "wrong": (230, 159, 0), "ignored": (128, 128, 128)}
IGNORE_COLOR = (255, 255, 255)   # ignored pixels in the colour-coded ground truth


class ReportError(ValueError):
  """The inputs of a report are unusable (shapes, missing keys)."""


# -- choices -----------------------------------------------------------------------------------


def select_samples(num_images: int, k: int = 4, seed: int = 0) -> list[int]:
  """A fixed, seeded choice of `k` of `num_images` image indices (sorted): the same images
  in every report of a split, so that reports of two checkpoints compare."""
  if num_images <= 0 or k <= 0:
    return []
  k = min(int(k), int(num_images))
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(int(num_images), size=k, replace=False))


def paper_row_for(result: Mapping):
  """The paper's table (`fusionsam_jax.data.datasets.PaperTable`) to draw next to `result`, or
  None: only for a real (not generated) MFNet / FMB result on the paper's split."""
  name = result.get("dataset")
  if not name or result.get("generated", False):
    return None
  table = paper_table(str(name))
  if table is None or result.get("split", table.split) != table.split:
    return None
  names = list(result.get("class_names") or [])
  if any(c not in names for c, _ in table.columns):
    return None
  return table


# -- metrics.jsonl -----------------------------------------------------------------------------


def read_curves(path) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """``{stage: {"loss": [(step, value)], "val_miou": [...]}}`` from a ``metrics.jsonl``.

  Rows are ``{"step", "time", "split": "<stage>/<train|val>", <name>: value}``. A step
  logged twice (a resumed run) keeps its last value; a torn last line is skipped.
  """
  curves: dict[str, dict[str, dict[int, float]]] = {}
  with open(os.fspath(path)) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      split = str(row.get("split", "train"))
      stage = split.split("/")[0] if "/" in split else "train"
      for key in ("loss", "val_miou"):
        v = row.get(key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)) and "step" in row:
          curves.setdefault(stage, {}).setdefault(key, {})[int(row["step"])] = float(v)
  return {s: {k: sorted(d.items()) for k, d in c.items()} for s, c in curves.items()}


# -- images ------------------------------------------------------------------------------------


def _lut(palette) -> np.ndarray:
  try:
    return palette_lut(palette, ignored=IGNORE_COLOR)
  except ValueError as e:
    raise ReportError(str(e)) from None


def colorize(label, palette) -> np.ndarray:
  """Class ids (H, W) -> RGB uint8 (H, W, 3); label 255 (ignored) is white."""
  a = np.asarray(label)
  if a.min(initial=0) < 0 or a.max(initial=0) > 255:
    raise ReportError("class ids must lie in [0, 255]")
  return _lut(palette)[a.astype(np.uint8)]


def error_map(label, pred, ignore_index: int = 255) -> np.ndarray:
  """RGB uint8 (H, W, 3): blue where the prediction is right, orange where it is wrong, grey
  where the label is `ignore_index`."""
  label, pred = np.asarray(label), np.asarray(pred)
  if label.shape != pred.shape:
    raise ReportError(f"label shape {label.shape} != prediction shape {pred.shape}")
  out = np.empty(label.shape + (3,), np.uint8)
  out[...] = ERROR_COLORS["wrong"]
  out[label == pred] = ERROR_COLORS["correct"]
  out[label == ignore_index] = ERROR_COLORS["ignored"]
  return out


def _as_display(img) -> tuple[np.ndarray, str | None]:
  a = np.asarray(img)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    return a, "gray"
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    return a, None
  raise ReportError(f"cannot show an image of shape {a.shape}")


# -- figures -----------------------------------------------------------------------------------


def _figure(w: float, h: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(w, h), dpi=100, layout="constrained")


def save_figure(fig, path: str) -> str:
  """Writes a matplotlib `fig` as a PNG at `path` (temp file + rename, mode 0644)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  with atomic_file(path) as tmp:
    fig.savefig(tmp, format="png")
  return path


def row_normalised(matrix) -> np.ndarray:
  """Each row divided by its sum (rows without pixels stay 0)."""
  m = np.asarray(matrix, np.float64)
  s = m.sum(1, keepdims=True)
  return np.divide(m, s, out=np.zeros_like(m), where=s > 0)


def plot_confusion(matrix, class_names: Sequence[str], path: str, title: str = "") -> str:
  m = row_normalised(matrix)
  c = len(class_names)
  size = max(4.0, 0.55 * c + 2.5)
  fig = _figure(size + 1.0, size)
  ax = fig.add_subplot()
  im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  ax.set_xticks(range(c), labels=class_names, rotation=45, ha="right")
  ax.set_yticks(range(c), labels=class_names)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth")
  ax.set_title(title or "confusion matrix (rows normalised)")
  if c <= 20:
    for t in range(c):
      for p in range(c):
        if m[t, p] >= 0.005:
          ax.text(p, t, f"{m[t, p]:.2f}", ha="center", va="center", fontsize=10,
                  color="white" if m[t, p] > 0.5 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row's pixels")
  return save_figure(fig, path)


def plot_iou(iou: Sequence[float | None], class_names: Sequence[str], path: str, *,
             miou: float | None = None, paper=None, label: str = "this run") -> str:
  """Bars of per-class IoU (%); the paper's row (a `PaperTable`) beside them where given."""
  vals = np.array([np.nan if v is None else float(v) * 100 for v in iou], np.float64)
  c = len(class_names)
  x = np.arange(c)
  # As tall as the confusion matrix beside it in the page (no empty band under the bars).
  fig = _figure(max(6.0, 0.7 * c + 2.0), max(4.0, 0.55 * c + 2.5))
  ax = fig.add_subplot()
  width = 0.4 if paper is not None else 0.7
  off = -width / 2 if paper is not None else 0.0
  mlab = "" if miou is None or not math.isfinite(miou) else f" (mIoU {miou * 100:.1f})"
  bars = ax.bar(x + off, np.nan_to_num(vals), width, label=label + mlab, color="#3b75af")
  for b, v in zip(bars, vals):
    ax.text(b.get_x() + b.get_width() / 2, (0 if np.isnan(v) else v) + 1,
            "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="bottom", fontsize=10)
  if paper is not None:
    ref = paper.iou_by_class()
    pv = np.array([ref.get(n, np.nan) for n in class_names], np.float64)
    have = ~np.isnan(pv)
    pb = ax.bar(x[have] + width / 2, pv[have], width, color="#e6862a",
                label=f"FusionSAM, paper's {paper.table} (mIoU {paper.miou:.1f})")
    for b, v in zip(pb, pv[have]):
      ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", va="bottom",
              fontsize=10)
  ax.set_xticks(x, labels=class_names, rotation=45, ha="right")
  ax.set_ylim(0, 110)
  ax.set_ylabel("IoU (%)")
  ax.set_title("per-class IoU")
  ax.legend(loc="upper right", fontsize=8)
  return save_figure(fig, path)


def plot_samples(samples: Sequence[Mapping], palette, path: str,
                 ignore_index: int = 255) -> str:
  """One row per sample: modalities, fused image, ground truth, prediction, error map."""
  if not samples:
    raise ReportError("no samples to show")
  mods = list(samples[0]["modalities"])
  cols = [(m, m) for m in mods]
  if samples[0].get("fused") is not None:
    cols.append(("fused", "fused image"))
  cols += [("label", "ground truth"), ("pred", "prediction"),
           ("error", "error (blue right, orange wrong)")]
  h, w = np.asarray(samples[0]["label"]).shape[:2]
  cell = 2.4
  fig = _figure(cell * len(cols), cell * h / max(w, 1) * len(samples) + 0.6)
  axes = fig.subplots(len(samples), len(cols), squeeze=False)
  for r, s in enumerate(samples):
    if list(s["modalities"]) != mods:
      raise ReportError(f"sample {s.get('name')}: modalities {list(s['modalities'])} != {mods}")
    label, pred = np.asarray(s["label"]), np.asarray(s["pred"])
    for c, (key, title) in enumerate(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if key in mods:
        img, cmap = _as_display(s["modalities"][key])
      elif key == "fused":
        img, cmap = _as_display(s["fused"])
      elif key == "label":
        img, cmap = colorize(label, palette), None
      elif key == "pred":
        img, cmap = colorize(pred, palette), None
      else:
        img, cmap = error_map(label, pred, ignore_index), None
      if img.shape[:2] != label.shape:
        raise ReportError(f"sample {s.get('name')}: {key} is {img.shape[:2]}, label "
                          f"{label.shape}")
      ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=255 if cmap else None,
                interpolation="nearest")
      if r == 0:
        ax.set_title(title, fontsize=9)
      if c == 0:
        ax.set_ylabel(str(s.get("name", r)), fontsize=8)
  return save_figure(fig, path)


def plot_curves(curves: Mapping[str, Mapping[str, list]], path: str) -> str | None:
  """Training loss per stage (one panel each; log scale when it spans > 20x) and val mIoU; None
  when there is nothing to draw."""
  stages = [s for s in curves if curves[s].get("loss")]
  val = {s: curves[s]["val_miou"] for s in curves if curves[s].get("val_miou")}
  panels = len(stages) + (1 if val else 0)
  if panels == 0:
    return None
  fig = _figure(3.6 * panels, 3.0)
  axes = fig.subplots(1, panels, squeeze=False)[0]
  for ax, s in zip(axes, stages):
    steps, vals = zip(*curves[s]["loss"])
    ax.plot(steps, vals, color="#3b75af", lw=1.2)
    if min(vals) > 0 and max(vals) / min(vals) > 20:
      ax.set_yscale("log")
    ax.set_title(f"{s}: training loss", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.grid(alpha=0.3)
  if val:
    ax = axes[-1]
    for s, pts in val.items():
      steps, vals = zip(*pts)
      ax.plot(steps, [v * 100 for v in vals], marker="o", ms=3, lw=1.2, label=s)
    ax.set_title("val mIoU (%)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return save_figure(fig, path)


# -- html --------------------------------------------------------------------------------------


def _data_uri(path: str) -> str:
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  e = html.escape
  head = "".join(f"<th>{e(str(h))}</th>" for h in header)
  rows = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>" for r in body)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead{background:#f2f2f2} img{max-width:100%;height:auto;border:1px solid #eee}
.meta{color:#555;font-size:0.9em} .note{color:#555;font-size:0.85em}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.row>div{flex:1 1 480px;min-width:0} #confusion_matrix{max-width:620px}
"""


def _class_rows(result: Mapping) -> tuple[list[str], list[list[str]]]:
  cm = ConfusionMatrix.from_matrix(result["confusion_matrix"])
  names = list(result.get("class_names") or [str(i) for i in range(cm.num_classes)])
  iou, acc = cm.iou(), cm.class_accuracy()
  gt = cm.matrix.sum(1)

  def f(v):
    return "-" if math.isnan(v) else f"{v * 100:.2f}"
  return (["class", "IoU(%)", "accuracy(%)", "ground-truth pixels"],
          [[n, f(iou[i]), f(acc[i]), str(int(gt[i]))] for i, n in enumerate(names)])


def write_report(out_dir, *, result: Mapping, metrics_jsonl=None,
                 samples: Sequence[Mapping] = (), palette=None, paper_row: Any = "auto",
                 title: str | None = None) -> dict[str, str]:
  """Writes the report's figures and ``report.html`` into `out_dir` (created).

  Args:
    out_dir: output folder.
    result: an evaluation result: ``confusion_matrix`` (C x C, rows = truth) and
      ``class_names``; ``dataset``, ``split``, ``checkpoint``, ``step``, ``num_images``,
      ``generated``, ``modalities``, ``sod`` are shown when present.
    metrics_jsonl: the run's ``metrics.jsonl`` for the curves (None or missing: no curves).
    samples: dicts with ``name``, ``modalities`` ({modality: uint8 (H, W, C)}), ``fused``
      (uint8 (H, W, 3) or None), ``label`` and ``pred`` (int (H, W), 255 = ignored), for the
      qualitative grid (empty: no grid).
    palette: one RGB colour per class (needed with samples).
    paper_row: a `fusionsam_jax.data.datasets.PaperTable` to draw beside this run, None for
      none, or "auto" (`paper_row_for(result)`: real MFNet / FMB test splits only).
    title: page title (default from dataset / split / checkpoint).

  Returns ``{name: path}`` of what was written (``report`` is the HTML). Raises
  `ReportError` (a ValueError) on unusable inputs.
  """
  if "confusion_matrix" not in result:
    raise ReportError("result has no confusion_matrix")
  cm = ConfusionMatrix.from_matrix(result["confusion_matrix"])
  names = list(result.get("class_names") or [str(i) for i in range(cm.num_classes)])
  if len(names) != cm.num_classes:
    raise ReportError(f"{len(names)} class names for a {cm.num_classes}-class matrix")
  if samples and palette is None:
    raise ReportError("palette is needed to draw samples")
  paper = paper_row_for(result) if isinstance(paper_row, str) and paper_row == "auto" \
      else paper_row
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths: dict[str, str] = {}
  paths["confusion_matrix"] = plot_confusion(cm.matrix, names,
                                             os.path.join(out_dir, "confusion_matrix.png"))
  paths["iou"] = plot_iou(list(cm.iou()), names, os.path.join(out_dir, "iou.png"),
                          miou=cm.miou(), paper=paper)
  if samples:
    ignore = result.get("ignore_index", 255)
    paths["samples"] = plot_samples(samples, palette, os.path.join(out_dir, "samples.png"),
                                    -1 if ignore is None else int(ignore))
  if metrics_jsonl is not None and os.path.isfile(os.fspath(metrics_jsonl)):
    p = plot_curves(read_curves(metrics_jsonl), os.path.join(out_dir, "curves.png"))
    if p:
      paths["curves"] = p

  ds, split = result.get("dataset", "?"), result.get("split", "?")
  title = title or f"FusionSAM evaluation: {ds} {split}"
  meta = []
  for key, lab in (("dataset", "dataset"), ("split", "split"), ("checkpoint", "checkpoint"),
                   ("step", "step"), ("num_images", "images"), ("modalities", "modalities")):
    if result.get(key) is not None:
      v = result[key]
      meta.append(f"{lab}: {'+'.join(v) if isinstance(v, (list, tuple)) else v}")
  if result.get("generated"):
    meta.append("generated scenes (the class names are borrowed; no paper comparison)")
  header, body = paper_table_rows(dict(result, class_names=names), method="this run",
                                  paper_row=paper is not None)
  e = html.escape
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           f"<p class='meta'>{e(' · '.join(meta))}</p>",
           "<h2>Results in the paper's columns</h2>", _html_table(header, body)]
  if paper is not None:
    parts.append(f"<p class='note'>The FusionSAM row is the paper's {e(paper.table)} "
                 f"({e(paper.dataset)} {e(paper.split)}), not this run; its mIoU is over all "
                 "classes.</p>")
  if result.get("sod"):
    s = result["sod"]
    parts += ["<h2>Saliency</h2>", _html_table(list(s), [[f"{float(v):.4f}" for v in
                                                          s.values()]])]
  parts += ["<div class='row'><div><h2>Per-class IoU</h2>",
            f"<img id='iou' alt='per-class IoU' src='{_data_uri(paths['iou'])}'></div>",
            "<div><h2>Confusion matrix</h2>",
            f"<img id='confusion_matrix' alt='confusion matrix' "
            f"src='{_data_uri(paths['confusion_matrix'])}'></div></div>"]
  if "samples" in paths:
    parts += ["<h2>Samples</h2>",
              f"<img id='samples' alt='qualitative samples' src='{_data_uri(paths['samples'])}'>"]
  if "curves" in paths:
    parts += ["<h2>Training curves</h2>",
              f"<img id='curves' alt='training curves' src='{_data_uri(paths['curves'])}'>"]
  ch, cb = _class_rows(result)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  parts += ["<h2>All classes</h2>", _html_table(ch, cb),
            f"<p class='note'>written {stamp} by fusionsam_jax.evaluators.report</p>",
            "</body></html>"]
  html_path = os.path.join(out_dir, "report.html")
  atomic_write(html_path, "\n".join(parts))
  paths["report"] = html_path
  return paths


# -- from a workdir ----------------------------------------------------------------------------


def samples_from_source(source, indices: Sequence[int], predict_fn,
                        modalities: Sequence[str]) -> list[dict]:
  """Report samples for elements `indices` of a random-access `source` (prepared-dataset
  elements: modality arrays, ``label``, ``name``). `predict_fn(element) -> {"pred", "fused"}`
  at the element's resolution (`fusionsam_jax.inference.Predictor`)."""
  out = []
  for i in indices:
    el = source[int(i)]
    name = el.get("name", str(i))
    if isinstance(name, bytes):
      name = name.decode()
    mods = {m: np.asarray(el[m]) for m in modalities}
    res = predict_fn(mods)
    out.append(dict(name=str(name), modalities=mods, fused=np.asarray(res["fused"]),
                    label=np.asarray(el["label"]), pred=np.asarray(res["pred"])))
  return out


def report_dir_for(result_path: str) -> str:
  """``WORKDIR/eval_<split>_<ckpt>.json`` -> ``WORKDIR/report_<split>_<ckpt>``."""
  d, base = os.path.split(os.fspath(result_path))
  stem = os.path.splitext(base)[0]
  stem = stem[len("eval_"):] if stem.startswith("eval_") else stem
  return os.path.join(d, f"report_{stem}")


def write_evaluation_report(config, workdir: str, result: Mapping, *, predictor=None,
                            checkpoint: str | int = "best", num_samples: int = 4,
                            seed: int = 0, out_dir: str | None = None) -> dict[str, str]:
  """The report of one `experiment.evaluate` result, next to its JSON (``result["path"]``):
  ``WORKDIR/report_<split>_<ckpt>/report.html``. The qualitative samples are a fixed,
  seeded choice (`select_samples`) of the split, segmented with `predictor` (an
  `inference.Predictor` of the run's `checkpoint`; needed when `num_samples` > 0)."""
  workdir = os.fspath(workdir)
  info = get_info(config.dataset)
  samples = []
  if num_samples > 0:
    spec = ensure_data(config, say=lambda m: None)
    source = spec.source(result.get("split", config.eval.split))
    idx = select_samples(len(source), num_samples, seed)
    if idx:
      if predictor is None:
        raise ValueError("write_evaluation_report: samples need a predictor")
      samples = samples_from_source(source, idx, predictor, tuple(config.model.modalities))
  if out_dir is None:
    out_dir = report_dir_for(result["path"]) if result.get("path") else os.path.join(
        workdir, f"report_{result.get('split', 'eval')}")
  metrics = os.path.join(workdir, "metrics.jsonl")
  return write_report(out_dir, result=result, metrics_jsonl=metrics if os.path.isfile(metrics)
                      else None, samples=samples, palette=info.palette)


if __name__ == "__main__":   # python -m fusionsam_jax.evaluators.report
  from fusionsam_jax.cli import driver, report
  driver.main(report)
