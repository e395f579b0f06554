r"""The user's GPU path end to end, measured: a random-init official SAM ``.pth`` -> the
converter -> a generated full-size MFNet-layout set -> prepare -> the train CLI on the paper
config (a short schedule) -> evaluate -> predict, then `benchmarks/train_step.py` on the same
config and machine, so each stage's loop step time can be compared with the benchmark's.

    python benchmarks/e2e_gpu.py --out benchmarks/results/e2e_h100.json            # vit_h
    python benchmarks/e2e_gpu.py --variant tiny --height 96 --width 128 --scenes 16 \
        --out /tmp/e2e_cpu.json                                                     # smoke

Records, per command: exit code and wall time; per stage (from the run's metrics.jsonl):
first-call time (compilation included), steady loop step time (median of the log rows after
the first), data wait per step, peak device memory, checkpoint bytes; the workdir's size; and
the step benchmark beside the loop. Needs `segment_anything` (to build the official model).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.train_runs import (make_pth, open_scratch, run, stage_stats,  # noqa: E402
                                   steps_overrides, tiny_pth, user_path_commands,
                                   user_path_config_args)

_OUT = flags.DEFINE_string("out", None, "JSON output")
_SCRATCH = flags.DEFINE_string("scratch", "runs/e2e", "scratch folder (deleted first)")
_VARIANT = flags.DEFINE_string("variant", "vit_h", "SAM variant of the random .pth")
_SCENES = flags.DEFINE_integer("scenes", 80, "generated scenes (about half train)")
_H = flags.DEFINE_integer("height", 480, "scene height")
_W = flags.DEFINE_integer("width", 640, "scene width")
_STEPS = flags.DEFINE_list("steps", ["30", "30", "60"], "steps per stage, in training order "
                            "(tokenizer, fusion, segmentation)")
_EXTRA = flags.DEFINE_list("extra", [], "more --config.X=Y overrides for train / benchmark")
_BENCH_STEPS = flags.DEFINE_integer("bench_steps", 10, "steps per timed benchmark run")
_ONLY = flags.DEFINE_list("only", [], "run only these commands (make_pth, convert, generate, "
                          "prepare, train, evaluate, predict, benchmark); with --resume, "
                          "earlier results are kept from SCRATCH/partial.json")
_DEADLINE = flags.DEFINE_float("deadline_s", 0.0, "stop commands this many seconds after "
                                "the start (0: none), so the JSON is still written")
_TEST_EVAL = flags.DEFINE_bool("test_eval", True, "evaluate on test at the end of train")
_RESUME = flags.DEFINE_bool("resume", False, "keep the scratch folder and earlier results")


def main(argv):
  del argv
  scratch = os.path.abspath(_SCRATCH.value)
  partial, earlier = open_scratch(scratch, _RESUME.value)
  only = set(_ONLY.value)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, "jax_cache"),
             PYTHONUNBUFFERED="1")
  res = dict(earlier or {"commands": {}}, environment=environment())
  t_all = time.perf_counter()
  pth = os.path.join(scratch, f"sam_{_VARIANT.value}_random.pth")
  if not only or "make_pth" in only or "convert" in only:
    res["make_pth_s"] = (tiny_pth(pth) if _VARIANT.value == "tiny"
                         else make_pth(_VARIANT.value, pth))
    res["pth_bytes"] = os.path.getsize(pth)
  ckpt, raw, data = (os.path.join(scratch, x) for x in ("ckpt", "raw", "data"))
  work = os.path.join(scratch, "run")
  py = sys.executable
  cfg = "configs/mfnet.py" + (":tiny" if _VARIANT.value == "tiny" else "")
  steps = [int(s) for s in _STEPS.value]
  common = user_path_config_args(cfg, data, ckpt, height=_H.value, width=_W.value,
                                 extra=_EXTRA.value)
  train_args = [*common, f"--workdir={work}",
                *steps_overrides(steps),
                f"--config.train.stages.tokenizer.disc_start={steps[0] // 3}",
                f"--config.train.eval_every={max(1, steps[-1] // 2)}",
                f"--config.train.checkpoint_every={max(1, steps[-1] // 2)}",
                "--config.train.log_every=5", "--noprogress",
                f"--config.eval.after_training={_TEST_EVAL.value}"]
  cmds = {
      **user_path_commands(py, pth, scratch, scenes=_SCENES.value, height=_H.value,
                           width=_W.value),
      "train": [py, "-m", "fusionsam_jax.train", *train_args],
      "evaluate": [py, "-m", "fusionsam_jax.evaluate", f"--workdir={work}"],
      "predict": [py, "-m", "fusionsam_jax.predict", "--workdir", work, "--input_dir", raw,
                  "--split", "test", "--out", os.path.join(scratch, "pred")],
      "benchmark": [py, "benchmarks/train_step.py", *common,
                    f"--workdir={os.path.join(scratch, 'bench')}",
                    f"--steps={_BENCH_STEPS.value}",
                    f"--out={os.path.join(scratch, 'bench.json')}"],
  }
  for name, cmd in cmds.items():
    if only and name not in only:
      continue
    left = (_DEADLINE.value - (time.perf_counter() - t_all)) if _DEADLINE.value else None
    if left is not None and left < 20:
      break
    res["commands"][name] = run(cmd, os.path.join(scratch, f"{name}.log"), env, left)
    write_json(partial, res)
    if res["commands"][name]["returncode"] != 0 and name not in ("evaluate", "predict"):
      break
  if os.path.exists(os.path.join(work, "metrics.jsonl")):
    res["stages"] = stage_stats(work)
    from fusionsam_jax.workdir import dir_bytes
    res["workdir_bytes"] = dir_bytes(work)
    res["converted_sam_bytes"] = dir_bytes(ckpt)
  bench = os.path.join(scratch, "bench.json")
  if os.path.exists(bench):
    b = json.load(open(bench))["stages"]
    res["benchmark"] = b
    for stage, s in res.get("stages", {}).items():
      ms = b.get(stage, {}).get("ms_per_step")
      if ms and s.get("loop_step_ms"):
        s["benchmark_ms"] = ms
        s["loop_over_benchmark"] = s["loop_step_ms"] / ms
  res["total_s"] = res.get("total_s", 0.0) + time.perf_counter() - t_all
  write_json(partial, res)
  res["all_exit_zero"] = all(c["returncode"] == 0 for c in res["commands"].values())
  res["commands_run"] = sorted(res["commands"])
  print(json.dumps({k: v for k, v in res.items() if k not in ("commands", "benchmark")},
                   indent=1, default=str))
  if _OUT.value:
    write_json(_OUT.value, res)
  return 0 if res["all_exit_zero"] else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
