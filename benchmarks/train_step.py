r"""Step time of the training stages, timed on exactly what `fusionsam_jax.train` runs.

    python benchmarks/train_step.py --config configs/mfnet.py:generated --workdir /tmp/bench \
        --config.model.sam_checkpoint=ckpt/sam_vit_h --stages tokenizer,fusion,segmentation \
        --out benchmarks/results/train_step_h100.json
    # CPU smoke run:
    python benchmarks/train_step.py --config configs/demo.py:tiny --workdir /tmp/bench \
        --steps 3 --out /tmp/train_step_cpu.json
    # SAM ViT-H against a SAM 2 Hiera-L backbone (model.backbone), same stages, one JSON:
    python benchmarks/train_step.py --config configs/mfnet.py:generated --workdir /tmp/bench \
        --config.model.sam_checkpoint=ckpt/sam_vit_h \
        --config.model.sam2_checkpoint=ckpt/sam2.1_hiera_l --stages segmentation \
        --backbones sam,sam2_hiera_l --out benchmarks/results/train_step_sam2_h100.json

For each stage (in its own subprocess, so peak device memory is per stage) it builds the
stage with `experiment.build_stage` -- the same `Stage` the train CLI runs: its trainable
set, its jitted step with the frozen params passed in, its data iterator (the embedding
cache for the staged segmentation stage) behind the loop's `DevicePrefetch` -- and times
``--steps`` steps dispatched back to back with one wait at the end (as the loop, which
fetches metrics only at log steps): ``ms_per_step`` is the median of 3 such runs.
``first_call_s``: the first step (compilation included). ``data_wait_ms``: time per step
the host waited for the next batch. ``peak_bytes``: the device's peak memory. With
``--backbones`` every stage runs once per ``model.backbone`` (workdir WORKDIR/<backbone>),
keyed ``<stage>@<backbone>``. ``--profile_steps N`` (GPU): N more steps under the JAX
profiler, summarized per stage as ``profile`` (device-busy vs wall time per step, kernel time
by class, the costliest kernels; `benchmarks/trace_summary.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config, as for train")
_WORKDIR = flags.DEFINE_string("workdir", None, "scratch workdir (embedding cache)")
_STAGES = flags.DEFINE_list("stages", [], "stages to time (default: every stage of "
                            "fusionsam_jax.stages.registry, in order)")
_STEPS = flags.DEFINE_integer("steps", 20, "steps per timed run")
_OUT = flags.DEFINE_string("out", None, "JSON output")
_BACKBONES = flags.DEFINE_list("backbones", [], "model.backbone values to time, e.g. "
                               "sam,sam2_hiera_l (default: the config's)")
_ONE = flags.DEFINE_string("one", None, "internal: time this stage, print JSON")
_PROFILE = flags.DEFINE_integer("profile_steps", 0, "after timing, trace this many steps "
                               "under the JAX profiler (WORKDIR/trace) and record where the "
                               "device time goes (benchmarks/trace_summary.py; GPU only)")
_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX persistent compilation cache "
                             "(as the train CLI's flag; the CLI's default location: "
                             "--compilation_cache=default); unset: off")


def time_stage(config, workdir: str, name: str, steps: int) -> dict:
  import jax
  import numpy as np
  from fusionsam_jax import experiment
  from fusionsam_jax.data.spec import strip_batch
  from fusionsam_jax.models import factory
  from fusionsam_jax.stages import common
  from fusionsam_jax.training import mesh as mesh_lib
  from fusionsam_jax.training.loop import DevicePrefetch
  from fusionsam_jax.training.state import count_params

  start = time.perf_counter()

  def phase(msg):  # to stderr (the parent's per-stage log): where a run cut short stood
    print(f"[{time.perf_counter() - start:7.1f} s] {name}: {msg}", file=sys.stderr, flush=True)

  phase("data + model")
  ctx = experiment.context(config, workdir, progress=False)
  phase("params")
  params = factory.init_params(config, ctx.model)
  stage = experiment.build_stage(ctx, name)
  if stage is None:
    return {"skipped": "nothing to train"}
  state = stage.init_state(common.select(params, stage.trainable))
  state = jax.device_put(state, mesh_lib.replicated(ctx.mesh))
  frozen = jax.device_put(stage.frozen(params), mesh_lib.replicated(ctx.mesh))
  phase("iterator (builds the embedding cache where the stage uses one)")
  t0 = time.perf_counter()
  it = stage.iterator(params)
  iterator_s = time.perf_counter() - t0
  batches = DevicePrefetch(it, lambda b: mesh_lib.shard_batch(strip_batch(b), ctx.mesh),
                           size=2)
  phase("first step (compilation)")
  t0 = time.perf_counter()
  state, m = stage.train_step(state, frozen, next(batches))
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  phase(f"first step {first:.1f} s; timing 3 x {steps} steps")
  runs = []
  for _ in range(3):
    w0 = batches.wait_s
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = stage.train_step(state, frozen, next(batches))
    jax.block_until_ready((state, m))
    runs.append(((time.perf_counter() - t0) / steps, (batches.wait_s - w0) / steps))
  profile = None
  if _PROFILE.value:
    from benchmarks import trace_summary
    phase(f"profiling {_PROFILE.value} steps")
    carry = [state]

    def one_step():
      carry[0], out = stage.train_step(carry[0], frozen, next(batches))
      return carry[0], out

    try:
      profile = trace_summary.profile(one_step, _PROFILE.value,
                                      os.path.join(workdir, "trace", name))
    except ValueError as e:    # a CPU run has no device kernels to summarize
      profile = {"error": str(e)}
  batches.close()
  ms = float(np.median([r[0] for r in runs]) * 1e3)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"ms_per_step": ms, "runs_ms": [r[0] * 1e3 for r in runs],
          "data_wait_ms": float(np.median([r[1] for r in runs]) * 1e3),
          "pairs_per_s": stage.batch_size / (ms / 1e3), "first_call_s": first,
          "iterator_setup_s": iterator_s, "batch_size": stage.batch_size,
          "trainable_params": count_params(common.select(params, stage.trainable)),
          "frozen_params_passed": count_params(stage.frozen(params)),
          "notes": list(stage.notes), "peak_bytes": stats.get("peak_bytes_in_use"),
          "loss": float(np.asarray(m["loss"])),
          **({"profile": profile} if profile is not None else {})}


def main(argv):
  del argv
  config = _CONFIG.value
  if _ONE.value:
    from fusionsam_jax.cli.driver import DEFAULT_COMPILATION_CACHE, enable_compilation_cache
    enable_compilation_cache(DEFAULT_COMPILATION_CACHE if _CACHE.value == "default"
                             else _CACHE.value)
    print("RESULT " + json.dumps(time_stage(config, _WORKDIR.value, _ONE.value, _STEPS.value)),
          flush=True)
    return 0
  results = {}
  passthrough = [a for a in sys.argv[1:]
                 if not a.startswith(("--out", "--stages", "--backbones", "--workdir"))]
  from benchmarks.train_runs import stage_names
  names = _STAGES.value or list(stage_names())
  runs = [(name, None) for name in names]
  if _BACKBONES.value:
    runs = [(name, b) for b in _BACKBONES.value for name in names]
  for name, backbone in runs:
    t0 = time.perf_counter()
    run_dir = _WORKDIR.value if backbone is None else os.path.join(_WORKDIR.value, backbone)
    extra = [f"--workdir={run_dir}"]
    if backbone is not None:
      extra.append(f"--config.model.backbone={backbone}")
    # The child's log (its progress lines and any traceback) stays on disk: a run cut short
    # by a time limit still shows where it stood.
    log = os.path.join(run_dir, f"train_step_{name}.log")
    os.makedirs(run_dir, exist_ok=True)
    print(f"{name}{'' if backbone is None else '@' + backbone}: log {log}", flush=True)
    with open(log, "w") as lf:
      r = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, *extra,
                          f"--one={name}"], stdout=subprocess.PIPE, stderr=lf, text=True)
    name = name if backbone is None else f"{name}@{backbone}"
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    results[name] = (json.loads(line[-1][7:]) if r.returncode == 0 and line else
                     {"error": (open(log).read() or r.stdout)[-3000:],
                      "returncode": r.returncode})
    results[name]["wall_s"] = time.perf_counter() - t0
    print(name, json.dumps({k: v for k, v in results[name].items() if k != "error"}),
          results[name].get("error", ""), flush=True)
    out = {"environment": environment(), "config": config.to_dict() if config else None,
           "steps": _STEPS.value, "stages": results}
    if _OUT.value:  # after every stage: a run cut short keeps what it measured
      write_json(_OUT.value, json.loads(json.dumps(out, default=str)))
  return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: sys.exit(main(argv)))
