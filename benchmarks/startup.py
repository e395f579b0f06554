r"""Start-up of the commands a user runs dozens of times a day, process start to exit.

    python benchmarks/startup.py --workdir runs/demo --train_config configs/demo.py:tiny \
        --out benchmarks/results/startup_cpu.json

Each row runs the command as a subprocess twice with one fresh JAX compilation cache: "cold"
(empty cache) and "warm" (the cache of the cold run). Rows:

* ``evaluate``: ``evaluate --workdir RUN --split S --noreport`` (the report adds its own
  figures; ``evaluate_report`` with it);
* ``predict``: ``predict --workdir RUN --split S`` (the run's own prepared split);
* ``bad_split`` / ``bad_checkpoint``: a typo in ``--split`` / a step the run has not saved,
  which must be refused before anything heavy;
* ``train``: ``train --config C`` in a new workdir each time (cold, then warm), with the
  compile split (tracing, lowering, XLA or cache load, cache reads) the train CLI prints;
* ``predictor``: ``Predictor(RUN)`` load and first call, in one Python process;
* ``import``: ``import fusionsam_jax.experiment`` alone.

Writes a JSON with the wall times, the device, versions and command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, write_json  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run (e.g. runs/demo)")
_SPLIT = flags.DEFINE_string("split", "test", "split to evaluate / predict")
_TRAIN_CONFIG = flags.DEFINE_string("train_config", None, "config of the train rows (None: "
                                    "no train rows), e.g. configs/demo.py:tiny")
_TRAIN_ARGS = flags.DEFINE_multi_string("train_arg", [], "extra train flag (repeat), e.g. "
                                        "--config.data_dir=D")
_OUT = flags.DEFINE_string("out", None, "JSON path")
_ROWS = flags.DEFINE_list("rows", ["import", "bad_split", "bad_checkpoint", "evaluate",
                                   "evaluate_report", "predict", "predictor", "train"],
                          "rows to measure")

COMPILE_LINE = re.compile(
    r"compilation: (\d+) programs, ([\d.]+) s \(tracing ([\d.]+), lowering ([\d.]+), XLA "
    r"compile or cache load ([\d.]+), of which cache reads ([\d.]+); (\d+) of (\d+)")


def timed(cmd: list[str], cache: str | None = None) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  row = {"wall_s": round(time.perf_counter() - t0, 2), "rc": r.returncode,
         "command": " ".join(cmd)}
  m = COMPILE_LINE.search(r.stdout)
  if m:
    keys = ("programs", "compile_s", "trace_s", "lower_s", "backend_s", "cache_read_s",
            "cache_hits", "cache_requests")
    row["compilation"] = {k: float(v) for k, v in zip(keys, m.groups())}
  p = re.search(r"PREDICTOR ([\d.]+) ([\d.]+)", r.stdout)
  if p:
    row["load_s"], row["first_call_s"] = float(p.group(1)), float(p.group(2))
  if r.returncode != 0:
    row["stderr_tail"] = r.stderr.strip().splitlines()[-3:]
  return row


def cold_warm(cmd_of, scratch: str) -> dict:
  cache = tempfile.mkdtemp(prefix="cache-", dir=scratch)
  return {"cold": timed(cmd_of("cold"), cache), "warm": timed(cmd_of("warm"), cache)}


def main(argv):
  del argv
  py, run_dir, split = sys.executable, _WORKDIR.value, _SPLIT.value
  scratch = tempfile.mkdtemp(prefix="startup-")
  rows: dict = {}
  try:
    want = set(_ROWS.value)
    if "import" in want:
      rows["import"] = timed([py, "-c", "import fusionsam_jax.experiment"])
    if run_dir and "bad_split" in want:
      rows["bad_split"] = timed([py, "-m", "fusionsam_jax.evaluate", f"--workdir={run_dir}",
                                 "--split=tset"])
    if run_dir and "bad_checkpoint" in want:
      rows["bad_checkpoint"] = timed([py, "-m", "fusionsam_jax.evaluate",
                                      f"--workdir={run_dir}", "--checkpoint=999999"])
    if run_dir and "evaluate" in want:
      rows["evaluate"] = cold_warm(lambda _: [
          py, "-m", "fusionsam_jax.evaluate", f"--workdir={run_dir}", f"--split={split}",
          "--noreport"], scratch)
    if run_dir and "evaluate_report" in want:
      rows["evaluate_report"] = cold_warm(lambda _: [
          py, "-m", "fusionsam_jax.evaluate", f"--workdir={run_dir}", f"--split={split}"],
          scratch)
    if run_dir and "predict" in want:
      rows["predict"] = cold_warm(lambda tag: [
          py, "-m", "fusionsam_jax.predict", f"--workdir={run_dir}", f"--split={split}",
          f"--out={os.path.join(scratch, 'pred-' + tag)}"], scratch)
    if run_dir and "predictor" in want:
      code = ("import time, numpy as np; t0 = time.perf_counter()\n"
              "from fusionsam_jax.inference import Predictor\n"
              f"p = Predictor({run_dir!r}); t1 = time.perf_counter()\n"
              "from fusionsam_jax.data import spec as D\n"
              f"el = D.ensure_data(p.config).source({split!r})[0]\n"
              "p({m: el[m] for m in p.modalities}); t2 = time.perf_counter()\n"
              "print(f'PREDICTOR {t1 - t0:.2f} {t2 - t1:.2f}')")
      rows["predictor"] = cold_warm(lambda _: [py, "-c", code], scratch)
    if _TRAIN_CONFIG.value and "train" in want:
      rows["train"] = cold_warm(lambda tag: [
          py, "-m", "fusionsam_jax.train", f"--config={_TRAIN_CONFIG.value}",
          f"--workdir={os.path.join(scratch, 'train-' + tag)}", "--noprogress",
          *_TRAIN_ARGS.value], scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  record = {"benchmark": "startup", "workdir": run_dir, "split": split, "rows": rows,
            "environment": environment()}
  print(record)
  if _OUT.value:
    write_json(_OUT.value, record)


if __name__ == "__main__":
  app.run(main)
