r"""The paper's training schedule, timed: every stage of a paper config run by the train CLI
(the same code as a user's run) on a random converted SAM and a generated full-size
MFNet-layout set, long enough for steady state, then projected to the full schedule.

    python benchmarks/schedule_time.py --out benchmarks/results/schedule_time_h100.json
    python benchmarks/schedule_time.py --variant tiny --height 96 --width 128 --scenes 16 \
        --steps 6,6,6 --staged_steps 6 --out /tmp/schedule_cpu.json                 # smoke

Runs, one persistent compilation cache for all (``SCRATCH/jax_cache``, empty at the start):

* ``joint``: the paper-faithful default (Eq. 1 jointly in the segmentation stage), cold
  compilation cache; ``--steps`` per stage.
* ``warm``: the same config again in a fresh workdir (``--warm_steps`` per stage): the
  compile time of a second run with the cache warm (issue 14 item 3: <= 15 s).
* ``staged``: the ``staged`` variant (fusion path frozen, embedding cache); its tokenizer and
  fusion stages are the joint run's (a few steps, compiled from the cache), its
  segmentation stage runs ``--staged_steps`` over the cache it builds.

Every run sets ``disc_start`` (the only schedule length the steps compile in) to the same
value, so the runs' tokenizer steps are one program. Per stage: compile (``first_step_s`` less
its wait for the first batch), steady loop step time (median over the log rows after the
first), data wait per step, eval cost per evaluation (the first one compiles), embedding-cache
build time, peak device memory (the process's peak so far: a stage's value covers the stages
before it). The projection
uses ``--epochs`` passes over ``--train_pairs`` (MFNet: 100 x 784) at the config's batch,
validation every ``train.eval_every_epochs`` over ``--val_pairs`` and one test evaluation
over ``--test_pairs``, eval and cache-build costs scaled per pair from the generated set.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import statistics
import sys
import time

# This process does no GPU work (the runs are subprocesses): no preallocation here, and the
# runs get the environment as it was.
_OWN_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.train_runs import (make_pth, open_scratch, run, stage_names,  # noqa: E402
                                   stage_stats, steps_overrides, tiny_pth,
                                   user_path_commands)

_OUT = flags.DEFINE_string("out", None, "JSON output")
_SCRATCH = flags.DEFINE_string("scratch", "runs/schedule_time", "scratch folder (deleted "
                               "first unless --resume)")
_VARIANT = flags.DEFINE_string("variant", "vit_h", "SAM variant of the random .pth ('tiny': "
                               "the configs' tiny variant, a CPU smoke run)")
_SCENES = flags.DEFINE_integer("scenes", 48, "generated scenes (about half train, a quarter "
                               "val)")
_H = flags.DEFINE_integer("height", 480, "scene height")
_W = flags.DEFINE_integer("width", 640, "scene width")
_STEPS = flags.DEFINE_list("steps", ["30", "30", "30"], "joint run: steps per stage, in "
                           "training order (tokenizer, fusion, segmentation)")
_WARM = flags.DEFINE_integer("warm_steps", 3, "warm run: steps per stage (> disc_start)")
_STAGED = flags.DEFINE_integer("staged_steps", 30, "staged run: steps of the last "
                               "(segmentation) stage")
_DISC = flags.DEFINE_integer("disc_start", 2, "tokenizer disc_start of every run")
_LOG = flags.DEFINE_integer("log_every", 5, "log rows every N steps")
_EVALS = flags.DEFINE_integer("evals", 2, "evaluations per segmentation stage")
_EXTRA = flags.DEFINE_list("extra", [], "more --config.X=Y overrides for every run")
_ONLY = flags.DEFINE_list("only", [], "run only these phases (setup, joint, warm, staged); "
                          "with --resume, earlier results are kept from SCRATCH/partial.json")
_RESUME = flags.DEFINE_bool("resume", False, "keep the scratch folder and earlier results")
_DEADLINE = flags.DEFINE_float("deadline_s", 0.0, "stop starting commands this many seconds "
                               "after the start (0: none), so the JSON is still written")
_EPOCHS = flags.DEFINE_float("epochs", 100.0, "projection: epochs per stage")
_TRAIN = flags.DEFINE_integer("train_pairs", 784, "projection: train pairs (MFNet)")
_VAL = flags.DEFINE_integer("val_pairs", 392, "projection: val pairs (MFNet)")
_TEST = flags.DEFINE_integer("test_pairs", 393, "projection: test pairs (MFNet)")


def _config_arg(staged: bool) -> str:
  variants = [v for v in (("tiny" if _VARIANT.value == "tiny" else ""),
                          ("staged" if staged else "")) if v]
  return "configs/mfnet.py" + (":" + ",".join(variants) if variants else "")


def _load_config(staged: bool):
  """The run's config as the CLI builds it (variants + the --extra overrides)."""
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  fv([sys.argv[0], f"--config={_config_arg(staged)}"])
  # A private FlagValues does not take ml_collections' --config.X overrides (absl reports
  # them as unknown flags): applied here, each value read as a Python literal or a string.
  config = fv.config
  for e in _EXTRA.value:
    key, _, text = e.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    config.update_from_flattened_dict({key: value})
  from fusionsam_jax.config_lib import normalize_overrides
  return normalize_overrides(config)


def split_sizes(data_dir: str) -> dict:
  from fusionsam_jax.data.sources import load_source
  return {s: len(load_source("mfnet", s, data_dir)) for s in ("train", "val", "test")}


def _log_number(log: str, pattern: str):
  m = re.findall(pattern, open(log).read()) if os.path.exists(log) else []
  return float(m[-1]) if m else None


def cache_meta(workdir: str) -> dict:
  """The embedding cache a run built: ``{train|val: {build_s, first_batch_s, num_examples}}``
  from each cache folder's meta.json (the first batch compiles; the rest is per image)."""
  import glob
  import json
  out = {}
  for kind in ("train", "val"):
    for m in sorted(glob.glob(os.path.join(workdir, "embedding_cache", f"{kind}-*",
                                           "meta.json"))):
      d = json.load(open(m))
      if "build_s" in d:
        out[kind] = {k: d.get(k) for k in ("build_s", "first_batch_s", "num_examples",
                                            "num_batches", "batch_size")}
  return out


def cache_projection(meta: dict, *, train_views: int, val_pairs: int) -> float | None:
  """Seconds to build the cache for `train_views` train views and `val_pairs` val images:
  each split's first batch (compilation) + its per-image cost after it."""
  total = 0.0
  for kind, n in (("train", train_views), ("val", val_pairs)):
    m = meta.get(kind)
    if not m:
      return None
    first = m.get("first_batch_s") or 0.0
    done = int(m.get("num_examples") or 0)
    per_batch = int(m.get("batch_size") or 0) or max(1, -(-done // max(1, int(
        m.get("num_batches") or 1))))
    rest = max(0, done - per_batch)
    per_image = (m["build_s"] - first) / rest if rest else first / max(1, done)
    total += first + per_image * max(0, n - min(n, per_batch))
  return total


def project(config, stats: dict, *, epochs: float, train_pairs: int, val_pairs: int,
            test_pairs: int, gen_sizes: dict, cache: dict | None, warm_compile: dict) -> dict:
  """The full schedule's wall time from measured per-stage numbers (seconds). `cache`: the
  staged run's `cache_meta` (None: no embedding cache)."""
  from fusionsam_jax.data import spec as D
  out, total = {}, 0.0
  names = stage_names()
  final = names[-1]   # the stage that validates and reads the embedding cache
  for stage in names:
    s = stats.get(stage) or {}
    if not s.get("loop_step_ms"):
      continue
    bs = D.stage_batch_size(config, stage)
    steps = int(math.ceil(D.steps_per_epoch(train_pairs, bs) * epochs))
    p = {"steps": steps, "batch_size": bs, "train_s": steps * s["loop_step_ms"] / 1e3,
         "compile_cold_s": s.get("first_step_s") or 0.0,
         "compile_warm_s": warm_compile.get(stage)}
    evals = s.get("eval_s") or []
    if stage == final and evals:
      # Per val pair, from the evaluations after the first (which compiles).
      per_pair = statistics.median(evals[1:] or evals) / max(1, gen_sizes["val"])
      every = D.steps_per_epoch(train_pairs, bs) * float(config.train.eval_every_epochs)
      n = int(math.ceil(steps / max(1, every)))
      p.update(eval_s_per_pair=per_pair, evals=n, eval_s=n * per_pair * val_pairs,
               test_eval_s=(per_pair * test_pairs) if config.eval.after_training else 0.0)
    if stage == final and cache:
      views = max(1, int(config.train.embedding_cache.num_views))
      p["cache_build_s"] = cache_projection(cache, train_views=train_pairs * views,
                                            val_pairs=val_pairs)
    p["total_s"] = (p["train_s"] + p["compile_cold_s"] + p.get("eval_s", 0.0)
                    + p.get("test_eval_s", 0.0) + (p.get("cache_build_s") or 0.0))
    out[stage] = p
    total += p["total_s"]
  out["total_s"] = total
  out["total_min"] = total / 60
  return out


def main(argv):
  del argv
  scratch = os.path.abspath(_SCRATCH.value)
  partial, earlier = open_scratch(scratch, _RESUME.value)
  only = set(_ONLY.value)
  res = {"runs": {}, "commands": {}, **earlier}
  t_all = time.perf_counter()

  def left():
    return (_DEADLINE.value - (time.perf_counter() - t_all)) if _DEADLINE.value else None

  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if _OWN_ENV:
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  py = sys.executable
  ckpt, data = (os.path.join(scratch, x) for x in ("ckpt", "data"))
  cache = os.path.join(scratch, "jax_cache")
  pth = os.path.join(scratch, f"sam_{_VARIANT.value}_random.pth")
  if not only or "setup" in only:
    res["make_pth_s"] = (tiny_pth(pth) if _VARIANT.value == "tiny"
                         else make_pth(_VARIANT.value, pth))
    for name, cmd in user_path_commands(py, pth, scratch, scenes=_SCENES.value,
                                        height=_H.value, width=_W.value).items():
      res["commands"][name] = run(cmd, os.path.join(scratch, f"{name}.log"), env, left())
      write_json(partial, res)
      if res["commands"][name]["returncode"] != 0:
        raise SystemExit(f"{name} failed; see {scratch}/{name}.log")
  gen_sizes = split_sizes(data)
  res["generated_pairs"] = gen_sizes
  names = stage_names()
  final = names[-1]
  joint_steps = tuple(int(s) for s in _STEPS.value)

  def train_cmd(name, staged, steps, evals):
    seg = steps[-1]
    every = max(1, seg // max(1, evals))
    return [py, "-m", "fusionsam_jax.train", f"--config={_config_arg(staged)}",
            f"--workdir={os.path.join(scratch, name)}", f"--compilation_cache={cache}",
            f"--config.data_dir={data}", f"--config.model.sam_checkpoint={ckpt}",
            "--config.model.allow_random_sam=False",
            f"--config.train.crop_size=({_H.value},{_W.value})",
            *steps_overrides(steps),
            f"--config.train.stages.tokenizer.disc_start={_DISC.value}",
            f"--config.train.eval_every={every}", f"--config.train.checkpoint_every={seg}",
            f"--config.train.log_every={_LOG.value}", "--config.eval.after_training=False",
            "--noprogress", *[f"--config.{e}" for e in _EXTRA.value]]

  # name: (staged variant, steps per stage, evaluations in the final stage)
  warm_steps = (_WARM.value,) * len(names)
  runs = {"joint": (False, joint_steps, _EVALS.value),
          "warm": (False, warm_steps, 1),
          "staged": (True, warm_steps[:-1] + (_STAGED.value,), _EVALS.value)}
  for name, (staged, steps, evals) in runs.items():
    if only and name not in only:
      continue
    lt = left()
    if lt is not None and lt < 30:
      res["runs"][name] = {"skipped": "deadline"}
      continue
    log = os.path.join(scratch, f"{name}.log")
    shutil.rmtree(os.path.join(scratch, name), ignore_errors=True)   # a fresh run, measured
    r = run(train_cmd(name, staged, steps, evals), log, env, lt)
    work = os.path.join(scratch, name)
    if os.path.exists(os.path.join(work, "metrics.jsonl")):
      r["stages"] = stage_stats(work)
    r["cache_build_s"] = _log_number(log, r"Embedding cache ready \(([0-9.]+) s\)")
    r["cache"] = cache_meta(work)
    # The whole run's compilation (the train CLI's last line): every program, not only steps.
    r["compilation"] = {k: _log_number(log, rf"compilation: .*?{pat} ([0-9.]+)")
                        for k, pat in (("total_s", r"programs,"), ("trace_s", r"tracing"),
                                       ("lower_s", r"lowering"),
                                       ("backend_s", r"cache load"),
                                       ("cache_read_s", r"cache reads"))}
    r["compilation"]["programs"] = _log_number(log, r"compilation: ([0-9]+) programs")
    r["data_workers"] = _log_number(log, r"input pipeline: ([0-9]+) grain worker")
    r["host_cores"] = _log_number(log, r"grain worker\(s\) on ([0-9]+) core")
    res["runs"][name] = r
    write_json(partial, res)

  # -- summary and projections
  summary = {}
  for name, r in res["runs"].items():
    for stage, s in (r.get("stages") or {}).items():
      if not s.get("steps"):
        continue
      first, wait0 = s.get("first_step_s"), s.get("first_data_wait_s") or 0.0
      summary.setdefault(name, {})[stage] = {
          # The first step less its wait for the first batch (loader start-up).
          "compile_s": None if first is None else first - wait0,
          "first_step_s": first, "first_data_wait_s": wait0,
          "first_step_compile": s.get("first_step_compile"),
          "step_ms": s.get("loop_step_ms"),
          "data_wait_ms_per_step": s.get("data_wait_ms"),
          "eval_s": s.get("eval_s"),
          "peak_gib_so_far": (s["peak_bytes"] / 2 ** 30) if s.get("peak_bytes") else None}
  res["summary"] = summary
  warm = {st: v.get("compile_s") for st, v in summary.get("warm", {}).items()}
  res["warm_compile_s"] = warm
  res["warm_compile_total_s"] = sum(v for v in warm.values() if v) if warm else None
  res["warm_compilation_whole_run"] = (res["runs"].get("warm") or {}).get("compilation")
  joint = (res["runs"].get("joint") or {}).get("stages") or {}
  staged = dict(joint)
  st_run = res["runs"].get("staged") or {}
  if (st_run.get("stages") or {}).get(final, {}).get("steps"):
    staged[final] = st_run["stages"][final]
  kw = dict(epochs=_EPOCHS.value, train_pairs=_TRAIN.value, val_pairs=_VAL.value,
            test_pairs=_TEST.value, gen_sizes=gen_sizes)
  # The warm run is the joint config: its segmentation compile is not the staged one's.
  warm_staged = {k: v for k, v in warm.items() if k != final}
  res["projection"] = {
      "joint": project(_load_config(False), joint, cache=None, warm_compile=warm, **kw),
      # Without its own segmentation numbers the staged projection would be the joint one.
      "staged": project(_load_config(True), staged, cache=st_run.get("cache") or None,
                        warm_compile=warm_staged, **kw)
      if staged.get(final) is not joint.get(final) else
      {"not_measured": "the staged run has no segmentation stage numbers "
                       f"(returncode {st_run.get('returncode', 'not run')})"}}
  res["settings"] = {"variant": _VARIANT.value, "scenes": _SCENES.value,
                     "size": [_H.value, _W.value], "steps": list(joint_steps),
                     "warm_steps": _WARM.value, "staged_steps": _STAGED.value,
                     "disc_start": _DISC.value, "extra": _EXTRA.value,
                     "projection": {"epochs": _EPOCHS.value, "train_pairs": _TRAIN.value,
                                    "val_pairs": _VAL.value, "test_pairs": _TEST.value}}
  res["total_s"] = time.perf_counter() - t_all
  res["environment"] = environment()   # after the runs: this process never holds the GPU
  res["all_exit_zero"] = all(r.get("returncode") == 0 for r in res["runs"].values()
                             if "returncode" in r)
  write_json(partial, res)
  import json
  print(json.dumps({k: res[k] for k in ("summary", "warm_compile_s", "projection",
                                        "all_exit_zero")}, indent=1, default=str))
  if _OUT.value:
    write_json(_OUT.value, res)
  return 0 if res["all_exit_zero"] else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
