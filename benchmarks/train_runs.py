"""What the GPU benchmarks that drive the CLIs share (`e2e_gpu.py`, `schedule_time.py`):
a random official SAM ``.pth``, commands run with their log and wall time, and the per-stage
numbers of a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pth(variant: str, path: str) -> float:
  """A randomly initialised official SAM (segment_anything's own builder), saved as .pth."""
  import torch
  t0 = time.perf_counter()
  from segment_anything import sam_model_registry
  torch.manual_seed(0)
  sam = sam_model_registry[variant](checkpoint=None)
  torch.save(sam.state_dict(), path)
  return time.perf_counter() - t0


def tiny_pth(path: str) -> float:
  t0 = time.perf_counter()
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import torch
  from sam_reference import build_torch_sam
  from fusionsam_jax.models.sam.sam import SAM_PRESETS
  torch.save(build_torch_sam(SAM_PRESETS["tiny"]).state_dict(), path)
  return time.perf_counter() - t0


def user_path_commands(py: str, pth: str, scratch: str, *, scenes: int, height: int,
                       width: int) -> dict:
  """The user's path from an official SAM ``.pth`` to a prepared dataset, as commands (name ->
  argv, in order): the converter into SCRATCH/ckpt, `scenes` generated MFNet-layout scenes
  into SCRATCH/raw, TFDS prepare into SCRATCH/data."""
  ckpt, raw, data = (os.path.join(scratch, x) for x in ("ckpt", "raw", "data"))
  return {
      "convert": [py, "tools/convert_sam_weights.py", "--checkpoint", pth, "--output", ckpt],
      "generate": [py, "-m", "fusionsam_jax.data.generate", "--layout", "mfnet", "--out", raw,
                   "--num", str(scenes), "--height", str(height), "--width", str(width)],
      "prepare": [py, "-m", "fusionsam_jax.data.prepare", "--dataset", "mfnet", "--manual_dir",
                  raw, "--data_dir", data, "--noprogress"],
  }


def user_path_config_args(config: str, data: str, ckpt: str, *, height: int, width: int,
                          extra=()) -> list[str]:
  """The train / evaluate / benchmark flags of the user's path: `config` (``configs/mfnet.py``
  or ``configs/mfnet.py:tiny``) on the prepared data at DATA with the converted SAM at CKPT
  (random SAM refused), full-size crops, then ``--config.X=Y`` for each ``X=Y`` of `extra`."""
  return [f"--config={config}", f"--config.data_dir={data}",
          f"--config.model.sam_checkpoint={ckpt}",
          f"--config.train.crop_size=({height},{width})",
          "--config.model.allow_random_sam=False", *[f"--config.{e}" for e in extra]]


def run(cmd, log, env=None, timeout=None):
  t0 = time.perf_counter()
  with open(log, "w") as f:
    try:
      rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                          timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  wall = time.perf_counter() - t0
  print(f"[{rc}] {wall:7.1f} s  {' '.join(cmd)[:160]}", flush=True)
  return {"cmd": " ".join(cmd), "returncode": rc, "wall_s": wall,
          "log_tail": open(log).read()[-1500:]}


def stage_names() -> tuple[str, ...]:
  """The training stages in order (`fusionsam_jax.stages.registry`)."""
  from fusionsam_jax.stages import registry
  return registry.NAMES


def steps_overrides(steps) -> list[str]:
  """``--config.train.stages.<stage>.num_steps=N`` for one count per stage, in order."""
  names = stage_names()
  if len(steps) != len(names):
    raise SystemExit(f"{len(steps)} step counts for {len(names)} stages ({', '.join(names)})")
  return [f"--config.train.stages.{n}.num_steps={int(s)}" for n, s in zip(names, steps)]


def stage_stats(workdir: str) -> dict:
  from fusionsam_jax.workdir import dir_bytes
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  out = {}
  for stage in stage_names():
    train = [r for r in rows if r.get("split") == f"{stage}/train"]
    events = {k: v for r in rows if r.get("split") == f"{stage}/event" for k, v in r.items()}
    steady = train[1:-1] or train[1:] or train
    out[stage] = {
        "loop_step_ms": 1e3 * statistics.median(r["step_time"] for r in steady) if steady
        else None,
        "loop_step_ms_rows": [1e3 * r["step_time"] for r in train],
        "data_wait_ms": 1e3 * statistics.median(r.get("data_wait", 0.0) for r in steady)
        if steady else None,
        "first_step_s": events.get("first_step_s"), "peak_bytes": events.get("peak_bytes"),
        "first_data_wait_s": events.get("first_data_wait_s"),
        # Of the first step: tracing, lowering, XLA compile or cache load (the loop's event).
        "first_step_compile": {k[len("compile_"):]: v for k, v in events.items()
                               if k.startswith("compile_")} or None,
        "eval_s": [r["eval_s"] for r in rows
                   if r.get("split") == f"{stage}/event" and "eval_s" in r],
        "steps": train[-1]["step"] if train else 0,
        "checkpoint_bytes": dir_bytes(os.path.join(workdir, "checkpoints", stage)),
        "last": {k: v for k, v in (train[-1] if train else {}).items()
                 if isinstance(v, (int, float))},
        # Every logged row's losses and codebook statistics: runs that differ in one setting
        # (e.g. model.train_dtype) compare as curves.
        "curve": [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in
                   ("time", "step_time", "pairs_per_s", "data_wait", "lr")} for r in train],
    }
  return out


def open_scratch(scratch: str, resume: bool) -> tuple[str, dict]:
  """The scratch folder of a GPU script (emptied first unless `resume`) and, when resuming,
  what its ``partial.json`` holds ({} otherwise). Returns (partial.json path, that dict)."""
  import json
  import shutil
  partial = os.path.join(scratch, "partial.json")
  if not resume:
    shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(scratch, exist_ok=True)
  if resume and os.path.exists(partial):
    with open(partial) as f:
      return partial, json.load(f)
  return partial, {}
