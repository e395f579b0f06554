r"""Train FusionSAM: tokenizers -> fusion -> segmentation, each stage resumable.

    python -m fusionsam_jax.train --config configs/mfnet.py --workdir runs/mfnet
    python -m fusionsam_jax.train --config configs/demo.py --workdir runs/demo
    python -m fusionsam_jax.train --config configs/mfnet.py:tiny --workdir /tmp/smoke \
        --config.train.batch_size=8

Re-running the same command resumes: complete stages are skipped, an interrupted stage
continues from its latest checkpoint (params, optimizer state, step, RNG, data-iterator
position). Logs: ``WORKDIR/metrics.jsonl`` and TensorBoard (``tensorboard --logdir
WORKDIR/tensorboard``). When training ends, the best checkpoint (by val mIoU) is evaluated on
``config.eval.split`` (default test) and the IoU table is printed.

Exit status: 0 done; 1 bad input / setup (missing dataset or SAM weights, the workdir in use
by another run, disk full, ...); 2 usage (a flag, config file, variant or key that does not
exist; a workdir that is a file or not writable); 3 non-finite loss (the message names the step and the loss term; nothing after the last good
checkpoint is kept); 4 the workdir was made by a different config.
"""

from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver

HEAVY = True


def run(config, workdir: str, *, allow_config_change: bool = False, progress: bool = True,
        step_hook=None) -> int:
  """Trains; returns the exit status (prints errors). `step_hook`: see `experiment.train`."""
  from fusionsam_jax import experiment
  from fusionsam_jax.jit_utils import CompileClock
  from fusionsam_jax.training.guards import NonFiniteLossError
  clock = CompileClock()
  compiled_before = clock.snapshot()
  reports: list[str] = []

  def report(summary, params, model):
    """The final evaluation's report.html, drawn with the params in memory."""
    from fusionsam_jax.evaluators.report import write_evaluation_report
    from fusionsam_jax.inference import Predictor
    predictor = Predictor.from_params(config, model, params, summary.get("step", 0), "best")
    paths = write_evaluation_report(config, workdir, summary, predictor=predictor)
    reports.append(paths["report"])

  try:
    result = experiment.train(config, workdir, allow_config_change=allow_config_change,
                              progress=progress, step_hook=step_hook,
                              on_evaluation=report if config.eval.get("report", True) else None)
  except NonFiniteLossError as e:
    # The learning rate is part of the workdir's config: changing it needs the flag.
    lr = f"--config.train.stages.{getattr(e, 'stage', None) or '<stage>'}.lr"
    print(f"error: training stopped: {e}. Check the data, or resume from that checkpoint "
          f"with a lower learning rate: the same command with {lr}=<lower> "
          "--allow_config_change.", file=sys.stderr, flush=True)
    return driver.EXIT_NONFINITE
  except Exception as e:  # noqa: BLE001 -- the library's errors: one line (bugs re-raised)
    return driver.print_error(e)
  stages = ", ".join(
      f"{k} " + ("skipped" if v["skipped"] else "%.0f s" % v["seconds"])
      for k, v in result.stages.items())
  print(f"done in {result.seconds:.1f} s ({stages})", flush=True)
  if result.evaluation:
    print(summary_line(workdir, result.evaluation), flush=True)
  for path in reports:
    print(f"report: {path}", flush=True)
  print(next_steps(workdir, config), flush=True)
  c = CompileClock.since(compiled_before, clock.snapshot())
  print(f"compilation: {c['programs']:.0f} programs, "
        f"{c['trace_s'] + c['lower_s'] + c['backend_s']:.1f} s (tracing {c['trace_s']:.1f}, "
        f"lowering {c['lower_s']:.1f}, XLA compile or cache load {c['backend_s']:.1f}, of "
        f"which cache reads {c['cache_read_s']:.1f}; {c['cache_hits']:.0f} of "
        f"{c['cache_requests']:.0f} from the persistent cache)", flush=True)
  return 0


def summary_line(workdir: str, evaluation: dict) -> str:
  """``best val mIoU 76.1 at step 1100; test mIoU 75.7`` (the val figure from metrics.jsonl)."""
  import json
  import os
  step = evaluation.get("step")
  val = None
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict) and row.get("step") == step and "val_miou" in row:
          val = row["val_miou"]
  except OSError:
    pass
  head = (f"best val mIoU {float(val) * 100:.1f} at step {step}" if isinstance(val, (int, float))
          else f"checkpoint {evaluation.get('checkpoint')} (step {step})")
  miou = evaluation.get("miou")
  return (f"{head}; {evaluation.get('split', 'test')} mIoU "
          + ("-" if miou is None else f"{float(miou) * 100:.1f}"))


def next_steps(workdir: str, config) -> str:
  """The commands a user runs next on the finished run."""
  return "\n".join([
      "next:",
      f"  tensorboard --logdir {workdir}/tensorboard",
      f"  python -m fusionsam_jax.evaluate --workdir {workdir} --split val",
      f"  python -m fusionsam_jax.predict --workdir {workdir} --split test --out "
      f"{workdir}/predictions"])


def define(fv) -> dict:
  return {
      "config": driver.config_flag(fv),
      "workdir": flags.DEFINE_string("workdir", None, "run folder: checkpoints, logs, caches",
                                     flag_values=fv),
      "allow_config_change": flags.DEFINE_bool(
          "allow_config_change", False, "continue in a workdir made with a different config "
          "(the old config.json is kept as config.<time>.json)", flag_values=fv),
      "progress": flags.DEFINE_bool("progress", True, "tqdm progress bars", flag_values=fv),
      "compilation_cache": driver.compilation_cache_flag(fv),
  }


REQUIRED = ("config", "workdir")


def body(f, args) -> int:
  config = driver.loaded_config(f["config"])
  driver.quiet_logs()
  driver.enable_compilation_cache(f["compilation_cache"].value)
  return run(config, f["workdir"].value, allow_config_change=f["allow_config_change"].value,
             progress=f["progress"].value)


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
