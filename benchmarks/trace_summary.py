"""Where a jitted step's device time goes, from a JAX profiler trace.

`profile(fn, steps, trace_dir)` runs ``fn()`` (one training step, or any callable that
dispatches device work) `steps` times inside ``jax.profiler.trace(...,
create_perfetto_trace=True)`` and `summarize` reads the Perfetto JSON that writes (plain
gzipped JSON: no TensorBoard plugin needed). Per step: the wall time, the time at least one
device kernel was running (the union of kernel intervals; wall minus busy is host / launch
gaps), the summed kernel time, that sum by kernel class (matmul, attention, convolution,
copy/transpose, reduction, other fusions), and the kernels that cost most.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

# Kernel classes, first match wins (names as CUDA / cuBLAS / cuDNN / XLA call them).
_CLASSES = (
    ("attention", re.compile(r"flash|fmha|cudnn.*attn|attention|sdpa", re.I)),
    # "conv" but not XLA's "*_convert_*" fusions (dtype casts).
    ("convolution", re.compile(r"conv(?!ert)|implicit_gemm|xmma_fprop|dgrad|wgrad", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|xmma|sm90_|matmul|dot", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|slice|pad",
                                  re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
)


def kernel_class(name: str) -> str:
  for cls, pat in _CLASSES:
    if pat.search(name):
      return cls
  return "other fusion"


def _union_ms(intervals) -> float:
  """Length of the union of (start, end) intervals (microseconds in, milliseconds out)."""
  total, cur_s, cur_e = 0.0, None, None
  for s, e in sorted(intervals):
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        total += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    total += cur_e - cur_s
  return total / 1e3


def summarize(trace_file: str, steps: int, wall_s: float | None = None, top: int = 25) -> dict:
  """Kernel time per step from one Perfetto trace (``perfetto_trace.json.gz``).

  Device kernels are the complete ('X') events of processes named ``/device:...``; every
  number is divided by `steps`. Raises ValueError when the trace holds no device events
  (a CPU run: XLA's CPU ops are not kernels on a device timeline)."""
  with gzip.open(trace_file, "rt") as f:
    d = json.load(f)
  events = d["traceEvents"] if isinstance(d, dict) else d
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
                 "process_name" and str(e.get("args", {}).get("name", "")).startswith(
                     "/device:")}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids
             and "dur" in e]
  if not kernels:
    raise ValueError(f"{trace_file}: no device kernels in the trace (a CPU-only run?)")
  by_name = collections.defaultdict(lambda: [0.0, 0])
  by_class = collections.defaultdict(float)
  for e in kernels:
    by_name[e["name"]][0] += e["dur"]
    by_name[e["name"]][1] += 1
    by_class[kernel_class(e["name"])] += e["dur"]
  kernel_ms = sum(v[0] for v in by_name.values()) / 1e3 / steps
  busy_ms = _union_ms((e["ts"], e["ts"] + e["dur"]) for e in kernels) / steps
  out = {"steps": steps, "kernels_per_step": len(kernels) / steps,
         "kernel_ms_per_step": kernel_ms, "device_busy_ms_per_step": busy_ms,
         "by_class_ms_per_step": {k: v / 1e3 / steps for k, v in
                                  sorted(by_class.items(), key=lambda kv: -kv[1])},
         "top_kernels": [{"name": n[:160], "class": kernel_class(n),
                          "ms_per_step": v[0] / 1e3 / steps, "calls_per_step": v[1] / steps,
                          "share": v[0] / 1e3 / steps / kernel_ms}
                         for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]}
  if wall_s is not None:
    out["wall_ms_per_step"] = wall_s * 1e3 / steps
    out["idle_ms_per_step"] = out["wall_ms_per_step"] - busy_ms
  return out


def profile(fn, steps: int, trace_dir: str, top: int = 25) -> dict:
  """Runs ``fn()`` `steps` times under the profiler (waiting on its outputs at the end, as
  the training loop does) and summarizes the trace."""
  import jax
  os.makedirs(trace_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                         recursive=True))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    wall = time.perf_counter() - t0
  new = sorted(set(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True)) - before)
  if not new:
    raise ValueError(f"{trace_dir}: the profiler wrote no perfetto_trace.json.gz")
  return summarize(new[-1], steps, wall_s=wall, top=top)
