r"""A soak of the user's GPU path: the same short paper-config training run N times back to
back on one machine, each in a fresh workdir with one shared compilation cache, `evaluate`
and `predict` after every k-th run, every command a subprocess with faulthandler on; the
report gives the crash rate per command and, for each crash, the faulting thread's stack.

    # vit_h, 80 generated 480 x 640 scenes, 4 steps a stage, val every 4 steps (issue 33)
    python benchmarks/gpu_soak.py --runs 10 --eval_every_run 3 \
        --out benchmarks/results/gpu_soak_h100.json
    # the segmentation stage alone (the crash's stage), as many warm runs as fit a call
    python benchmarks/gpu_soak.py --steps 0,0,4 --parallel 0 --deadline_s 490 \
        --out benchmarks/results/gpu_soak_h200.json
    # CPU smoke: the tiny config on tiny scenes
    python benchmarks/gpu_soak.py --variant tiny --scenes 8 --height 96 --width 128 \
        --runs 1 --out /tmp/soak_cpu.json

One-time setup (as `benchmarks/e2e_gpu.py`): a random official SAM ``.pth``
(segment_anything's builder) and the converter, beside generate and prepare. Then run 0
(cold: it fills the compilation cache) and runs 1..N-1 (warm), `--parallel` at a time (each
process's GPU memory share is then ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.9 / parallel unless
set); warm runs start once run 0's segmentation stage has validated. ``--reuse_setup`` goes on
in the same scratch folder (a second call on a machine still warm: no setup, no cold run) and
reports the earlier runs with the new ones.

Per command: exit status (a negative return code is the signal that ended it; a shell's
128 + signal counts too), wall time, the faulthandler dump ("Fatal Python error: ...", every
thread's Python stack, the faulting one first), the log's tail, and for train the last
``metrics.jsonl`` row and each stage's first-step / compile-cache / val-pass events. With
``--core_dir`` (and a kernel ``core_pattern`` writing there), a crashed command's core file
is read by cuda-gdb or gdb for the native stacks. ``--self_check`` first runs a child that
kills itself with SIGSEGV, so the report shows that a crash would have been caught.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.train_runs import (make_pth, open_scratch, run, steps_overrides,  # noqa: E402
                                   tiny_pth,
                                   user_path_commands, user_path_config_args)

def define_flags(fv) -> dict:
  """The script's flags on `fv`, defined when it runs (importing it defines none, so tests
  can import it beside other benchmarks). Returns {name: FlagHolder}."""
  d = {"flag_values": fv}
  return {
      "out": flags.DEFINE_string("out", None, "JSON report", **d),
      "scratch": flags.DEFINE_string("scratch", "runs/soak", "scratch folder (emptied first, "
                                     "unless --reuse_setup)", **d),
      "variant": flags.DEFINE_string("variant", "vit_h", "SAM variant of the random .pth "
                                     "(tiny: the tiny config, for a CPU smoke run)", **d),
      "scenes": flags.DEFINE_integer("scenes", 80, "generated scenes", **d),
      "height": flags.DEFINE_integer("height", 480, "scene height", **d),
      "width": flags.DEFINE_integer("width", 640, "scene width", **d),
      "steps": flags.DEFINE_list("steps", ["4", "4", "4"], "tokenizer, fusion, segmentation "
                                 "steps (0,0,4: the segmentation stage alone, the stage of "
                                 "issue 33's crash, in a third of the compile time)", **d),
      "eval_every": flags.DEFINE_integer("eval_every", 4, "train.eval_every (steps)", **d),
      "extra": flags.DEFINE_list("extra", [], "more X=Y config overrides for train", **d),
      "runs": flags.DEFINE_integer("runs", 10, "training runs (the first one cold)", **d),
      "parallel": flags.DEFINE_integer("parallel", 1, "warm runs at a time on the one device "
                                       "(0: as many as fit PEAK_GB each in 90% of the GPU's "
                                       "memory, at most 4; 1 without a GPU)", **d),
      "eval_every_run": flags.DEFINE_integer("eval_every_run", 3, "evaluate + predict after "
                                             "every k-th run (0: never)", **d),
      "deadline_s": flags.DEFINE_float("deadline_s", 0.0, "start no command that would end "
                                       "after this many seconds from the start (0: no limit)",
                                       **d),
      "estimate_s": flags.DEFINE_float("estimate_s", 150.0, "with --deadline_s: the expected "
                                       "seconds of a command not yet timed warm", **d),
      "self_check": flags.DEFINE_bool("self_check", True, "first run a child that kills itself "
                                      "with SIGSEGV and check that it is recorded as a crash",
                                      **d),
      "core_dir": flags.DEFINE_string("core_dir", None, "where the kernel writes core files "
                                      "(core_pattern); a crash's core is read with cuda-gdb / "
                                      "gdb", **d),
      "compilation_cache": flags.DEFINE_string("compilation_cache", None, "the runs' "
                                               "compilation cache (default SCRATCH/jax_cache; "
                                               "none: off, every run compiles)", **d),
      "reuse_setup": flags.DEFINE_bool("reuse_setup", False, "keep the scratch folder's "
                                       "converted weights, data and compilation cache (a "
                                       "second call on the same machine)", **d),
  }


#: A child that dies of SIGSEGV with faulthandler on, as a crash of a CLI would.
SEGV_PROBE = ("import faulthandler, os, signal; faulthandler.enable(); "
              "os.kill(os.getpid(), signal.SIGSEGV)")
_FATAL_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}


def exit_status(returncode) -> dict:
  """What ended a child: ``{"signal": "SIGSEGV" | None, "crashed": bool}``. A negative
  return code is the signal (subprocess); 128 + a fatal signal is a shell's report of one."""
  if not isinstance(returncode, int):               # "timeout"
    return {"signal": None, "crashed": False}
  sig = -returncode if returncode < 0 else (returncode - 128 if returncode > 128 else None)
  try:
    sig = signal.Signals(sig) if sig else None
  except ValueError:
    sig = None
  return {"signal": sig.name if sig else None,
          "crashed": sig in _FATAL_SIGNALS}


def fault_stack(text: str, limit: int = 12000) -> str | None:
  """The last faulthandler dump in a log: from ``Fatal Python error`` to the end (the
  faulting thread is the one marked ``Current thread``), at most `limit` characters."""
  i = text.rfind("Fatal Python error")
  return text[i:i + limit] if i >= 0 else None


def last_metrics_row(workdir: str) -> dict | None:
  """The last readable row of ``workdir/metrics.jsonl`` (a killed run may leave half a line)."""
  try:
    lines = open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8",
                 errors="replace").read().splitlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict):
      return row
  return None


def stage_events(workdir: str) -> dict:
  """Per stage: first-step time, compile-cache hits / requests and val-pass seconds."""
  out = {}
  try:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  except (OSError, ValueError):
    return out
  for r in rows:
    split = str(r.get("split", ""))
    if not split.endswith("/event"):
      continue
    s = out.setdefault(split[:-len("/event")], {})
    for k in ("first_step_s", "compile_cache_hits", "compile_cache_requests",
              "compile_programs", "peak_bytes"):
      if k in r:
        s[k] = r[k]
    if "eval_s" in r:
      s.setdefault("eval_s", []).append(r["eval_s"])
  return out


def validated(metrics_path: str, stage: str = "segmentation") -> bool:
  """Whether a run's metrics.jsonl has a val row of `stage` (its val pass ran)."""
  try:
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
      return any(f'"{stage}/val"' in line for line in f)
  except OSError:
    return False


def native_stacks(core_dir: str | None, since: float) -> str | None:
  """cuda-gdb's (else gdb's) backtrace of every thread of the newest core file in
  `core_dir` written after `since`; None when there is none or no debugger."""
  if not core_dir:
    return None
  cores = [p for p in glob.glob(os.path.join(core_dir, "*")) if os.path.getmtime(p) >= since]
  dbg = shutil.which("cuda-gdb") or shutil.which("gdb")
  if not cores or dbg is None:
    return None
  core = max(cores, key=os.path.getmtime)
  try:
    r = subprocess.run([dbg, "-batch", "-ex", "info threads", "-ex", "thread apply all bt 25",
                        sys.executable, core], capture_output=True, text=True, timeout=300)
    text = r.stdout + r.stderr
  except (OSError, subprocess.TimeoutExpired) as e:
    text = f"{dbg} failed: {e}"
  finally:
    try:
      os.unlink(core)                  # tens of GB on a GPU host
    except OSError:
      pass
  return f"{os.path.basename(core)}:\n" + text[-20000:]


def run_command(cmd, log, env, timeout=None, *, workdir=None, core_dir=None) -> dict:
  """`train_runs.run` (log, wall time, exit code) plus what ended the child, its
  faulthandler dump and, with `workdir`, the run's last metrics row and stage events."""
  t0 = time.time()
  rec = run(cmd, log, env, timeout)
  rec.update(exit_status(rec["returncode"]))
  text = open(log, encoding="utf-8", errors="replace").read()
  rec["fault_stack"] = fault_stack(text) if rec["crashed"] else None
  # faulthandler marks the faulting thread "Current thread" only when it runs Python; a fault
  # in an XLA, CUDA or cuDNN thread leaves every Python thread unmarked.
  rec["fault_in_python_thread"] = (None if rec["fault_stack"] is None
                                   else "Current thread" in rec["fault_stack"])
  if rec["crashed"]:
    rec["native_stacks"] = native_stacks(core_dir, t0)
  if workdir is not None:
    rec["last_metrics_row"] = last_metrics_row(workdir)
    rec["stage_events"] = stage_events(workdir)
  return rec


def summarize(runs: list[dict]) -> dict:
  """Per command (train split into cold and warm): runs, crashes, other failures, timeouts,
  crash rate and median wall time."""
  groups: dict[str, list] = {}
  for r in runs:
    for name, rec in r["commands"].items():
      key = f"train_{'cold' if r['cold'] else 'warm'}" if name == "train" else name
      groups.setdefault(key, []).append(rec)
      if name == "train":
        groups.setdefault("train", []).append(rec)
  out = {}
  for key, recs in groups.items():
    crashes = sum(r["crashed"] for r in recs)
    timeouts = sum(r["returncode"] == "timeout" for r in recs)
    failures = sum(r["returncode"] not in (0, "timeout") and not r["crashed"] for r in recs)
    out[key] = {"runs": len(recs), "crashes": crashes, "failures": failures,
                "timeouts": timeouts, "crash_rate": crashes / len(recs),
                "median_wall_s": statistics.median(r["wall_s"] for r in recs)}
  return out


#: GPU memory one training process of the paper config needs (peak in use: 28.3 GB,
#: benchmarks/results/e2e_h100.json), with some room.
PEAK_GB = 32.0


def auto_parallel() -> int:
  """How many training processes fit the first GPU (nvidia-smi's total memory); 1 if none."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                          "nounits"], capture_output=True, text=True, timeout=30).stdout
    mib = float(out.split()[0])
  except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
    return 1
  return max(1, min(4, int(0.9 * mib / 1024 / PEAK_GB)))


def child_env(parallel: int) -> dict:
  env = dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
  if parallel > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.2f}"
  return env


def main(a) -> int:
  """`a`: the flag values (`define_flags`), as attributes."""
  t_all = time.perf_counter()
  scratch = os.path.abspath(a.scratch)
  partial, earlier = open_scratch(scratch, a.reuse_setup)
  py = sys.executable
  parallel = a.parallel if a.parallel > 0 else auto_parallel()
  env = child_env(parallel)
  # This process only records the environment: it must not take the GPU's memory from the
  # children (JAX preallocates 75% of it when it starts a GPU backend).
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if a.core_dir:
    import resource
    os.makedirs(a.core_dir, exist_ok=True)
    # Bounded: a GPU process's core can be tens of GB, and the runs share the disk.
    try:
      resource.setrlimit(resource.RLIMIT_CORE, (24 << 30, 24 << 30))
    except (ValueError, OSError):
      print("cannot raise the core-file size limit; no native stacks", flush=True)
  tiny = a.variant == "tiny"
  cfg = "configs/mfnet.py" + (":tiny" if tiny else "")
  ckpt, raw, data = (os.path.join(scratch, x) for x in ("ckpt", "raw", "data"))
  cache = a.compilation_cache or os.path.join(scratch, "jax_cache")
  use_cache = cache.lower() != "none"
  steps = [int(x) for x in a.steps]
  try:
    step_flags = steps_overrides(steps)
  except SystemExit as e:
    print(f"--steps: {e}")
    return 2
  train_flags = [
      *user_path_config_args(cfg, data, ckpt, height=a.height, width=a.width,
                             extra=a.extra),
      *step_flags,
      f"--config.train.eval_every={a.eval_every}", "--noprogress",
      f"--compilation_cache={cache}"]
  res = {"environment": environment(), "child_env": {
             k: env[k] for k in ("PYTHONFAULTHANDLER", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                 "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR") if k in env},
         "settings": {"variant": a.variant, "scenes": a.scenes,
                      "height": a.height, "width": a.width,
                      "steps": dict(zip(("tokenizer", "fusion", "segmentation"), steps)),
                      "eval_every": a.eval_every, "runs": a.runs,
                      "parallel": parallel, "eval_every_run": a.eval_every_run,
                      "extra": list(a.extra), "compilation_cache": cache},
         "setup": {}, "runs": []}
  if earlier:                      # --reuse_setup: one report over this call and the earlier
    res["runs"] = earlier.get("runs", [])
    res["setup"] = earlier.get("setup", {})
    res["earlier_environments"] = (earlier.get("earlier_environments", [])
                                   + [earlier.get("environment")])
  lock = threading.Lock()

  def save():
    with lock:
      res["summary"] = summarize(res["runs"])
      res["total_s"] = time.perf_counter() - t_all
      write_json(partial, res)
      if a.out:
        write_json(a.out, res)

  def left():
    return (a.deadline_s - (time.perf_counter() - t_all)) if a.deadline_s else None

  logs = os.path.join(scratch, "logs")
  os.makedirs(logs, exist_ok=True)
  if a.self_check:
    rec = run_command([py, "-c", SEGV_PROBE], os.path.join(logs, "self_check.log"), env)
    rec["ok"] = bool(rec["crashed"] and rec["signal"] == "SIGSEGV" and rec["fault_stack"]
                     and "Segmentation fault" in rec["fault_stack"])
    res["self_check"] = rec
    if not rec["ok"]:
      save()
      print("self check failed: a SIGSEGV child was not recorded as a crash", flush=True)
      return 1

  # One-time setup: the user's path from a .pth to prepared data.
  pth = os.path.join(scratch, f"sam_{a.variant}_random.pth")
  have_setup = a.reuse_setup and all(os.path.exists(p) for p in (ckpt, data))
  if not have_setup:
    cmds = user_path_commands(py, pth, scratch, scenes=a.scenes, height=a.height,
                              width=a.width)

    def chain(names, before=None) -> bool:
      if before is not None:
        res["setup"]["make_pth_s"] = before()
      for name in names:
        for d in {"convert": (ckpt,), "generate": (raw,), "prepare": (data,)}[name]:
          shutil.rmtree(d, ignore_errors=True)
        res["setup"][name] = run_command(cmds[name], os.path.join(logs, f"{name}.log"), env)
        if res["setup"][name]["returncode"] != 0:
          return False
      return True

    # The weights and the data do not depend on each other: made side by side.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      weights = pool.submit(chain, ["convert"], (lambda: tiny_pth(pth)) if tiny
                            else (lambda: make_pth(a.variant, pth)))
      scenes = pool.submit(chain, ["generate", "prepare"])
      ok = weights.result() and scenes.result()
    if not ok:
      save()
      print("a setup command failed: " + ", ".join(
          k for k, v in res["setup"].items() if isinstance(v, dict) and v["returncode"]),
          flush=True)
      return 1
  else:
    res["setup"]["reused"] = True
  save()

  first = max([len(glob.glob(os.path.join(scratch, "run_*")))]
              + [r["index"] + 1 for r in res["runs"]])
  warm_cache = use_cache and os.path.isdir(cache) and bool(os.listdir(cache))
  durations: dict[str, list] = {}

  def fits(name: str) -> bool:
    remaining = left()
    if remaining is None:
      return True
    d = durations.get(name)          # warm runs only: a cold run compiles
    return remaining > (1.1 * max(d) if d else a.estimate_s)

  def one_run(i: int, cold: bool) -> dict | None:
    if not fits("train"):
      return None
    work = os.path.join(scratch, f"run_{i:02d}")
    entry = {"index": i, "cold": cold, "workdir": work, "commands": {}}
    cmds = {"train": [py, "-m", "fusionsam_jax.train", *train_flags, f"--workdir={work}"]}
    k = a.eval_every_run
    if k > 0 and (i + 1) % k == 0:
      cmds["evaluate"] = [py, "-m", "fusionsam_jax.evaluate", f"--workdir={work}",
                          f"--compilation_cache={cache}"]
      cmds["predict"] = [py, "-m", "fusionsam_jax.predict", "--workdir", work, "--input_dir",
                         raw, "--split", "test", "--out", os.path.join(work, "pred"),
                         f"--compilation_cache={cache}"]
    for name, cmd in cmds.items():
      if name != "train" and not fits(name):
        break
      t = left()
      rec = run_command(cmd, os.path.join(logs, f"run_{i:02d}_{name}.log"), env,
                        None if t is None else max(t, 1.0),
                        workdir=work if name == "train" else None, core_dir=a.core_dir)
      entry["commands"][name] = rec
      with lock:
        if rec["returncode"] == 0 and not cold:
          durations.setdefault(name, []).append(rec["wall_s"])
      if name == "train" and rec["returncode"] != 0:
        break
    with lock:
      res["runs"].append(entry)
    save()
    return entry

  indices = list(range(first, first + a.runs))
  # `parallel` processes on the device at a time. The cold run fills the compilation cache;
  # warm runs start once its segmentation stage has validated (every program of a training
  # run is compiled and cached by then), in the slots it leaves free.
  slots = threading.Semaphore(parallel)

  def in_slot(i: int, cold: bool):
    with slots:
      return one_run(i, cold)

  cold = None
  if indices and use_cache and not warm_cache:
    i0 = indices.pop(0)
    cold = threading.Thread(target=in_slot, args=(i0, True), name="cold-run")
    cold.start()
    marker = os.path.join(scratch, f"run_{i0:02d}", "metrics.jsonl")
    while cold.is_alive() and not validated(marker):
      time.sleep(2.0)
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    list(pool.map(lambda i: in_slot(i, not use_cache), indices))
  if cold is not None:
    cold.join()
  res["runs"].sort(key=lambda r: r["index"])
  save()
  res["crashes"] = [{"run": r["index"], "command": name, "signal": c["signal"],
                     "fault_in_python_thread": c["fault_in_python_thread"],
                     "fault_stack": c["fault_stack"], "native_stacks": c.get("native_stacks")}
                    for r in res["runs"] for name, c in r["commands"].items() if c["crashed"]]
  save()
  s = res["summary"]
  print(json.dumps(s, indent=1), flush=True)
  print(f"{sum(v['crashes'] for k, v in s.items() if k != 'train')} crash(es) in "
        f"{sum(len(r['commands']) for r in res['runs'])} commands; {len(res['runs'])} runs",
        flush=True)
  return 0


if __name__ == "__main__":
  from benchmarks.common import flag_namespace
  _holders = define_flags(flags.FLAGS)
  app.run(lambda argv: sys.exit(main(flag_namespace(_holders))))
