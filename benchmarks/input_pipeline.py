r"""Training input-pipeline throughput (pairs/s) by worker count, at MFNet size, on CPU.

    python benchmarks/input_pipeline.py [--workers=0,1,2] [--batches 30]
    # smoke run (small pairs, few batches; --out away from the committed result):
    python benchmarks/input_pipeline.py --workers=0 --num 8 --size=96,128 --crop=96,128 \
        --batch_size 2 --batches 2 --warmup 1 --out /tmp/input_pipeline_smoke.json

Generates an MFNet-layout scene set at 480 x 640 (no download), prepares it as TFDS ArrayRecord,
then times ``train_loader`` (zlib decode, random scale 0.5-2 + crop 480 x 640 + flip, batching)
for each worker count. Prints a table and writes JSON to
``benchmarks/results/input_pipeline_cpu.json``. The load average before and after each run is
recorded: other processes on the machine slow the numbers down. absl flags (``--help``); lists
are comma-separated (``--size=480,640``, ``--scale=0.5,2``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import define_number_list, flag_namespace  # noqa: E402
from fusionsam_jax.cli.driver import run_cli  # noqa: E402
from fusionsam_jax.data import generate, pipeline, prepare  # noqa: E402
from fusionsam_jax.data.sources import load_source  # noqa: E402


def _versions():
  import grain
  import jax
  import PIL
  import tensorflow_datasets as tfds
  return {"python": platform.python_version(), "numpy": np.__version__,
          "grain": getattr(grain, "__version__", "?"), "tensorflow_datasets": tfds.__version__,
          "jax": jax.__version__, "pillow": PIL.__version__}


def _device():
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  model = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"kind": "cpu", "cpu_model": model, "cpus_available": cpus,
          "machine": platform.machine(), "system": platform.system()}


def _stage_costs(source, crop, scale, n=24):
  """In-process ms per pair for reading (decode) and augmenting, for context."""
  t = time.perf_counter()
  els = [source[i % len(source)] for i in range(n)]
  read_ms = (time.perf_counter() - t) / n * 1e3
  std = pipeline.Standardize()
  aug = pipeline.RandomScaleCropFlip(crop, scale)
  els = [std.map(e) for e in els]
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for e in els:
    aug.random_map(e, rng)
  aug_ms = (time.perf_counter() - t) / n * 1e3
  return read_ms, aug_ms


def _time_loader(source, workers, args):
  loader = pipeline.train_loader(
      source, batch_size=args.batch_size, crop_size=tuple(args.crop),
      scale_range=tuple(args.scale), seed=0, worker_count=workers,
      shard_options=pipeline.grain.ShardOptions(0, 1, drop_remainder=True))
  load0 = os.getloadavg()[0]
  t0 = time.perf_counter()
  it = iter(loader)
  for _ in range(args.warmup):
    next(it)
  t1 = time.perf_counter()
  for _ in range(args.batches):
    b = next(it)
  t2 = time.perf_counter()
  assert b["rgb"].shape == (args.batch_size, *args.crop, 3)
  pairs = args.batches * args.batch_size
  res = {"workers": workers, "pairs_per_s": pairs / (t2 - t1), "timed_pairs": pairs,
         "startup_and_warmup_s": t1 - t0, "loadavg_1min_before": load0,
         "loadavg_1min_after": os.getloadavg()[0]}
  del it
  return res


def _define(fv):
  from absl import flags
  return {
      "workers": define_number_list(fv, "workers", [0, 1, 2], "worker counts", min_length=1),
      "num": flags.DEFINE_integer("num", 64, "generated pairs (all splits)", flag_values=fv),
      "size": define_number_list(fv, "size", [480, 640], "generated pair size H,W", length=2),
      "crop": define_number_list(fv, "crop", [480, 640], "crop size H,W", length=2),
      "scale": define_number_list(fv, "scale", [0.5, 2.0], "random scale range LO,HI",
                                  kind=float, length=2),
      "batch_size": flags.DEFINE_integer("batch_size", 8, "batch size", flag_values=fv),
      "batches": flags.DEFINE_integer("batches", 60, "timed batches per worker count",
                                      flag_values=fv),
      "warmup": flags.DEFINE_integer("warmup", 3, "untimed batches (worker start-up)",
                                     flag_values=fv),
      "out": flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "results", "input_pipeline_cpu.json"),
                                 "JSON path", flag_values=fv),
  }


def _run(f, _):
  args = flag_namespace(f)
  pipeline._ensure_flags_parsed()

  tmp = tempfile.mkdtemp(prefix="fusionsam-input-bench-")
  try:
    t = time.perf_counter()
    generate.generate_dataset("mfnet", os.path.join(tmp, "src"), args.num, seed=0,
                              height=args.size[0], width=args.size[1])
    prepare.prepare_dataset("mfnet", os.path.join(tmp, "src"), os.path.join(tmp, "dst"),
                            progress=False)
    setup_s = time.perf_counter() - t
    source = load_source("mfnet", "train+val+test", os.path.join(tmp, "dst"))
    read_ms, aug_ms = _stage_costs(source, tuple(args.crop), tuple(args.scale))
    results = [_time_loader(source, w, args) for w in args.workers]
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  print(f"MFNet-size pairs {args.size[0]}x{args.size[1]}, crop {args.crop[0]}x{args.crop[1]}, "
        f"scale {args.scale[0]}-{args.scale[1]}, flip, batch {args.batch_size}")
  print(f"in-process stage costs: read+decode {read_ms:.1f} ms/pair, "
        f"augment {aug_ms:.1f} ms/pair")
  print(f"{'workers':>8} {'pairs/s':>9} {'start-up s':>11} {'load before/after':>18}")
  for r in results:
    print(f"{r['workers']:>8} {r['pairs_per_s']:>9.1f} {r['startup_and_warmup_s']:>11.1f} "
          f"{r['loadavg_1min_before']:>8.2f} / {r['loadavg_1min_after']:<8.2f}")
  record = {
      "benchmark": "input_pipeline (training loader)",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
      "device": _device(), "versions": _versions(),
      "config": {"size": args.size, "crop": args.crop, "scale_range": args.scale,
                 "flip_prob": 0.5, "batch_size": args.batch_size, "num_pairs": args.num,
                 "timed_batches": args.batches, "warmup_batches": args.warmup,
                 "storage": "TFDS ArrayRecord, zlib-encoded uint8 tensors (generated scenes)"},
      "setup_s": setup_s,
      "stage_ms_per_pair": {"read_decode": read_ms, "augment": aug_ms},
      "results": results,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
  print(f"wrote {args.out}")
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/input_pipeline.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
