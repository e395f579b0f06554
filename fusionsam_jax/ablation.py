r"""The Fig. 7b ablation study: every variant of one config trained and evaluated, one table.

    from fusionsam_jax import ablation
    record = ablation.run(config, "runs/ablate_demo")   # full, (A), (B), one per modality

Each variant trains with `experiment.train` in its own workdir ``ROOT/<variant>`` (resumable)
and is evaluated on the best checkpoint by val mIoU; ``ROOT/ablation.{json,md,png}`` hold the
table. The command: `fusionsam_jax.cli.ablate` (``python -m fusionsam_jax.ablate``).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from fusionsam_jax import config_lib, experiment, workdir as W
from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.evaluators.report import save_figure
from fusionsam_jax.fsutil import atomic_write, atomic_write_json
from fusionsam_jax.metrics.miou import format_iou_table


#: Row labels of the table / chart.
LABELS = {"full": "Full", "ablation_a": "(A) no LSTG", "ablation_b": "(B) concat",
          "rgb_only": "RGB only", "thermal_only": "Thermal only", "depth_only": "Depth only"}
RESULT_FILE = "ablate_result.json"     # per variant workdir: the finished variant's record


def variant_names(config) -> list[str]:
  """The variants of Fig. 7b for `config`: full, (A), (B), one per modality (when there
  are several)."""
  names = ["full", "ablation_a", "ablation_b"]
  mods = tuple(config.model.modalities)
  if len(mods) > 1:
    names += [f"{m}_only" for m in mods]
  return names


def variant_config(config, name: str):
  """A copy of `config` with variant `name` applied (``full``: unchanged); its
  ``variant`` field lists the config's own variants and this one."""
  c = copy.deepcopy(config)
  if name == "full":
    return c
  if name not in config_lib.VARIANTS:
    raise ValueError(f"unknown ablation variant {name!r}; known: {', '.join(LABELS)}")
  config_lib.VARIANTS[name](c)
  c.variant = ",".join([v for v in str(c.get("variant", "") or "").split(",") if v] + [name])
  return c


def environment() -> dict:
  """Machine and versions of this run."""
  env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "host": platform.node(), "machine": platform.machine(),
         "processor": platform.processor(), "cpu_count": os.cpu_count(),
         "python": platform.python_version(),
         "devices": [str(d.device_kind) for d in jax.devices()]}
  try:
    with open("/proc/cpuinfo") as f:
      model = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    if model:
      env["cpu_model"] = model[0]
  except OSError:
    pass
  for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy"):
    try:
      env[mod] = __import__(mod, fromlist=["__version__"]).__version__
    except Exception:  # pylint: disable=broad-except
      pass
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                                       capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
  except Exception:  # pylint: disable=broad-except
    pass
  return env


def _record(name: str, config, workdir: str, summary: dict, train_result,
            wall: float) -> dict:
  stages = {k: {"skipped": bool(v["skipped"]), "steps": int(v["steps"]),
                "seconds": float(v["seconds"])} for k, v in train_result.stages.items()}
  return {"variant": name, "label": LABELS.get(name, name), "workdir": workdir,
          "config_variant": str(config.get("variant", "")),
          "modalities": list(config.model.modalities),
          "split": summary["split"], "checkpoint": summary.get("checkpoint"),
          "step": summary.get("step"), "num_images": summary.get("num_images"),
          "iou": summary["iou"], "miou": summary["miou"],
          "mean_class_accuracy": summary.get("mean_class_accuracy"),
          "pixel_accuracy": summary.get("pixel_accuracy"),
          "eval_json": summary.get("path"),
          "wall_seconds": wall, "stages": stages,
          "resumed": any(v["skipped"] for v in stages.values()),
          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds")}


def run_variant(config, name: str, workdir: str, *, progress: bool = True,
                say=print) -> dict:
  """Trains (resumably) and evaluates one variant; returns its record (also written to
  ``workdir/ablate_result.json``). A workdir holding a finished record for the same config
  is not trained again."""
  path = os.path.join(workdir, RESULT_FILE)
  if os.path.isfile(path):
    W.check_config_matches(config, workdir)
    with open(path) as f:
      rec = json.load(f)
    if rec.get("eval_json") and os.path.isfile(rec["eval_json"]):
      say(f"== variant '{name}': finished earlier ({path}); not retrained")
      rec["reused"] = True
      return rec
  say(f"== variant '{name}' ({LABELS.get(name, name)}): workdir {workdir}")
  t0 = time.perf_counter()
  result = experiment.train(config, workdir, progress=progress)
  summary = result.evaluation
  if summary is None:
    summary = experiment.evaluate(config, workdir, "best", str(config.eval.split))
  rec = _record(name, config, workdir, summary, result, time.perf_counter() - t0)
  atomic_write_json(rec, path)
  rec["reused"] = False
  return rec


def table_rows(records: list[dict], class_names) -> dict:
  return {r["label"]: np.asarray([np.nan if r["iou"].get(n) is None else r["iou"][n]
                                  for n in class_names], np.float64) for r in records}


def markdown(records: list[dict], class_names, split: str) -> str:
  lines = [f"# Ablation (Fig. 7b): {split} split, best checkpoint by val mIoU", "",
           format_iou_table(table_rows(records, class_names), class_names, markdown=True), "",
           "| Variant | workdir | mIoU (%) | wall (s) |", "|---|---|---|---|"]
  for r in records:
    miou = "-" if r["miou"] is None else f"{r['miou'] * 100:.1f}"
    lines.append(f"| {r['label']} | {os.path.basename(r['workdir'])} | {miou} | "
                 f"{r['wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str, title: str) -> str:
  """mIoU per variant as a bar chart (matplotlib Agg, no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(1.3 * len(records) + 2.0, 3.8), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  vals = [0.0 if r["miou"] is None else 100.0 * r["miou"] for r in records]
  bars = ax.bar(range(len(records)), vals, color=["#1f77b4"] + ["#999999"] * (len(vals) - 1))
  for b, v in zip(bars, vals):
    ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom")
  ax.set_xticks(range(len(records)), labels=[r["label"] for r in records])
  ax.set_ylabel("mIoU (%)")
  ax.set_ylim(0, max(vals + [1.0]) * 1.15)
  ax.set_title(title)
  return save_figure(fig, path)


def run(config, workdir_root: str, variants: list[str] | None = None, *,
        progress: bool = True, command: str | None = None) -> dict:
  """Runs the study; returns the JSON record (also written to
  ``workdir_root/ablation.json``). Raises on errors."""
  workdir_root = os.path.abspath(os.fspath(workdir_root))
  names = variants or variant_names(config)
  configs = {n: variant_config(config, n) for n in names}    # fails early on a bad name
  class_names = list(get_info(config.dataset).class_names)
  records = []
  for n in names:
    records.append(run_variant(configs[n], n, os.path.join(workdir_root, n),
                               progress=progress))
  split = str(config.eval.split)
  record = {
      "what": "FusionSAM ablation (paper Fig. 7b): each variant trained with "
              "fusionsam_jax.train's code path and evaluated on the best checkpoint (val mIoU)",
      "dataset": str(config.dataset), "config_variant": str(config.get("variant", "")),
      "split": split, "class_names": class_names,
      "command": command or " ".join([sys.executable, "-m", "fusionsam_jax.ablate"]
                                     + sys.argv[1:]),
      "environment": environment(),
      "variants": {r["variant"]: r for r in records}}
  json_path = os.path.join(workdir_root, "ablation.json")
  atomic_write_json(record, json_path)
  md_path = os.path.join(workdir_root, "ablation.md")
  text = markdown(records, class_names, split)
  atomic_write(md_path, text)
  source = (f"generated {config.dataset}-layout scenes" if config.get("generate") is not None
            else config.dataset)
  png = plot(records, os.path.join(workdir_root, "ablation.png"),
             f"{source}, {split} split: ablation (Fig. 7b)")
  print(f"\nAblation (Fig. 7b), {config.dataset} {split} split, best checkpoint by val mIoU:")
  print(format_iou_table(table_rows(records, class_names), class_names))
  print("wall time: " + ", ".join(f"{r['label']} {r['wall_seconds']:.0f} s"
                                  + (" (earlier run)" if r.get("reused") else "")
                                  for r in records))
  print(f"wrote {json_path}, {md_path}, {png}", flush=True)
  return record
