"""Where the time goes in a `jax.profiler` perfetto trace (from `train_step.py --profile-dir`).

  python benchmarks/trace_summary.py PROFILE_DIR/segmentation_cached [--top 25] [--steps 3]

Finds the newest ``*.trace.json.gz`` under the directory, and for each device process (the GPU
streams; the host threads when there is no device) sums event durations by XLA op
(``args.hlo_op`` when the event has it, else the event name); ``--host``: the host threads
instead (Python, dispatch, XLA runtime). Prints the total busy time per
step and the top ops with their share.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys


def load(path: str) -> dict:
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
      raise FileNotFoundError(f"{path}: no *.trace.json.gz below it (run train_step.py "
                              f"with --profile-dir)")
    path = found[-1]
  with gzip.open(path, "rt") as f:
    return json.load(f)


def summarise(trace: dict, steps: int, top: int, host: bool = False) -> str:
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {p for p, n in names.items() if "gpu" in n.lower() or "device" in n.lower()}
  by_pid = collections.defaultdict(collections.Counter)
  count = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if device_pids and (e["pid"] in device_pids) == host:
      continue
    args = e.get("args") or {}
    key = args.get("hlo_op") or args.get("long_name") or e.get("name", "?")
    by_pid[e["pid"]][key] += float(e["dur"])
    count[e["pid"]][key] += 1
  lines = []
  for pid, c in by_pid.items():
    total = sum(c.values())
    lines.append(f"== {names.get(pid, pid)}: {total / steps / 1e3:.2f} ms busy per step "
                 f"({len(c)} distinct ops)")
    for k, us in c.most_common(top):
      lines.append(f"  {us / steps / 1e3:8.3f} ms  {100 * us / total:5.1f}%  "
                   f"x{count[pid][k] // steps:<4d} {k[:110]}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("path", help="a profile directory (or a .trace.json.gz file)")
  p.add_argument("--steps", type=int, default=3, help="steps the trace holds")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--host", action="store_true", help="host threads instead of the devices")
  a = p.parse_args(argv)
  try:
    print(summarise(load(a.path), a.steps, a.top, a.host))
  except (OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
