r"""The demo's numbers: the fused, RGB-only and thermal-only demo runs, back to back.

    python benchmarks/demo_runs.py                       # -> benchmarks/results/demo_cpu.json
    python benchmarks/demo_runs.py --root /tmp/demo_runs --out /tmp/demo_cpu.json

Runs, one after the other (never side by side), the README's demo command and its two
single-modality variants, each as a fresh user would: a new workdir, an empty JAX
compilation cache of its own (so compilation is paid as on a fresh clone), and the generated
scene set made by the first run (``ROOT/demo_data``; the fused run's wall time includes
generating and preparing it, as the README's first command does):

    python -m fusionsam_jax.train --config configs/demo.py[:rgb_only|:thermal_only] \
        --workdir ROOT/<run> --config.data_dir=ROOT/demo_data --compilation_cache=ROOT/<run>/jax_cache

Per run the JSON has the wall time of that command measured around the child process (as
``/usr/bin/time``: wall, user and system CPU seconds, peak RSS), the per-stage seconds the
train CLI prints, the best val mIoU (model selection, the val split only), the test table the
run ends with (per-class IoU from ``eval_test_best.json``) and, measured after the timed
command, the per-class val IoU of the same checkpoint (``python -m fusionsam_jax.evaluate
--split val``). Also: the machine (CPU model, cores, load average before and after each
run: a loaded machine shows there), versions, the commit and the exact commands.
Wall times are only comparable between runs on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402

_RUNS = flags.DEFINE_list("runs", ["fused", "rgb_only", "thermal_only"], "runs, in order")
_ROOT = flags.DEFINE_string("root", os.path.join(ROOT, "runs", "demo_runs"),
                            "folder of the workdirs (emptied first)")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "demo_cpu.json"),
                           "JSON output")
_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "demo config file")
_EXTRA = flags.DEFINE_multi_string("override", [], "extra --config.X=V for every run (for "
                                   "checking the script itself at few steps)")
_KEEP = flags.DEFINE_bool("keep", False, "keep ROOT's earlier contents (data, workdirs)")

VARIANT = {"fused": "", "rgb_only": "rgb_only", "thermal_only": "thermal_only"}


def machine() -> dict:
  m = {"machine": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count()}
  try:
    m["cpus_available"] = len(os.sched_getaffinity(0))
  except AttributeError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    m["cpu_model"] = names[0] if names else None
  except OSError:
    pass
  try:
    with open("/proc/meminfo") as f:
      m["mem_total_kb"] = int(f.readline().split()[1])
  except (OSError, ValueError, IndexError):
    pass
  return m


def loadavg():
  try:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
  except OSError:
    return None


def timed(cmd: list[str], log_path: str, env: dict) -> dict:
  """Runs `cmd` (cwd: the repository), its output to `log_path`; wall, CPU and peak RSS
  of the child as /usr/bin/time reports them."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"returncode": rc, "wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
          "sys_s": after.ru_stime - before.ru_stime,
          "max_rss_kb_so_far": after.ru_maxrss}   # ru_maxrss of children: the largest so far


def parse_stages(text: str) -> dict:
  """Per-stage seconds, embedding-cache seconds and the evaluation's seconds from the train
  CLI's output."""
  out = {}
  for name, sec in re.findall(r"== stage '(\w+)' done in ([0-9.]+) s", text):
    out[name] = float(sec)
  m = re.search(r"Embedding cache ready \(([0-9.]+) s\)", text)
  if m:
    out["embedding_cache (in segmentation)"] = float(m.group(1))
  m = re.search(r"^done in ([0-9.]+) s", text, re.M)
  if m:
    out["train_cli_total"] = float(m.group(1))
  return out


def best_val(workdir: str) -> dict:
  rows = [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl")) if ln.strip()]
  vals = [(r["step"], r["val_miou"]) for r in rows
          if r.get("split") == "segmentation/val" and "val_miou" in r]
  if not vals:
    return {}
  step, v = max(vals, key=lambda x: (x[1], -x[0]))
  return {"best_val_miou": v, "best_val_step": step, "val_curve": vals}


def table(summary: dict) -> dict:
  keep = ("split", "checkpoint", "step", "num_images", "iou", "miou", "mean_class_accuracy",
          "pixel_accuracy", "seconds")
  return {k: summary.get(k) for k in keep}


def run_one(name: str, root: str, data_dir: str) -> dict:
  work = os.path.join(root, name)
  cache = os.path.join(work, "jax_cache")
  os.makedirs(cache, exist_ok=True)
  cfg = _CONFIG.value + (f":{VARIANT[name]}" if VARIANT[name] else "")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "fusionsam_jax.train", f"--config={cfg}", f"--workdir={work}",
         f"--config.data_dir={data_dir}", f"--compilation_cache={cache}", "--noprogress",
         *_EXTRA.value]
  rec = {"run": name, "config": cfg, "command": " ".join(cmd), "load_before": loadavg()}
  print(f"== {name}: {rec['command']}", flush=True)
  rec.update(timed(cmd, os.path.join(root, f"{name}.log"), env))
  rec["load_after"] = loadavg()
  text = open(os.path.join(root, f"{name}.log")).read()
  if rec["returncode"] != 0:
    rec["error"] = text[-3000:]
    return rec
  rec["stages_s"] = parse_stages(text)
  rec.update(best_val(work))
  rec["test"] = table(json.load(open(os.path.join(work, "eval_test_best.json"))))
  # Val per class of the same (best) checkpoint: after the timed command.
  ecmd = [sys.executable, "-m", "fusionsam_jax.evaluate", f"--workdir={work}", "--split=val",
          "--noreport", f"--compilation_cache={cache}"]
  ev = timed(ecmd, os.path.join(root, f"{name}_val.log"), env)
  rec["val_command"] = " ".join(ecmd)
  if ev["returncode"] == 0:
    rec["val"] = table(json.load(open(os.path.join(work, "eval_val_best.json"))))
  else:
    rec["val_error"] = open(os.path.join(root, f"{name}_val.log")).read()[-3000:]
  t = rec["test"]
  print(f"   {name}: wall {rec['wall_s']:.1f} s (user {rec['user_s']:.0f} s, sys "
        f"{rec['sys_s']:.0f} s), stages {rec['stages_s']}, best val mIoU "
        f"{rec.get('best_val_miou')}, test mIoU {t['miou']:.4f}", flush=True)
  return rec


def git_commit():
  try:
    c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                       capture_output=True, text=True)
    return {"commit": c.stdout.strip(), "dirty": bool(d.stdout.strip())}
  except OSError:
    return {}


def main(argv):
  del argv
  root = os.path.abspath(_ROOT.value)
  if os.path.isdir(root) and not _KEEP.value:
    shutil.rmtree(root)
  os.makedirs(root, exist_ok=True)
  data_dir = os.path.join(root, "demo_data")
  out = {"benchmark": "demo runs (README's demo command and its single-modality variants), "
                      "sequential, each with an empty compilation cache",
         "command": " ".join([sys.executable] + sys.argv), "machine": machine(),
         "environment": environment(), "git": git_commit(), "overrides": _EXTRA.value,
         "runs": {}}
  for name in _RUNS.value:
    if name not in VARIANT:
      raise app.UsageError(f"--runs {name}: expected some of {', '.join(VARIANT)}")
    out["runs"][name] = run_one(name, root, data_dir)
    write_json(_OUT.value, out)    # after every run: a run cut short keeps what it measured
  fused = out["runs"].get("fused", {}).get("test", {}).get("miou")
  if fused is not None:
    out["gaps"] = {n: fused - r["test"]["miou"] for n, r in out["runs"].items()
                   if n != "fused" and r.get("test")}
  write_json(_OUT.value, out)
  print(f"wrote {_OUT.value}", flush=True)
  return 0 if all(r.get("returncode") == 0 for r in out["runs"].values()) else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
