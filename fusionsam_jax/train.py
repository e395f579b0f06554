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

from absl import app, flags
from ml_collections import config_flags

from fusionsam_jax.cli_common import (DEFAULT_COMPILATION_CACHE, EXIT_CONFIG, EXIT_ERROR,
                                      EXIT_NONFINITE, EXIT_USAGE, enable_compilation_cache,
                                      one_line, parse_flags_or_exit, quiet_logs,
                                      reexec_with_huge_pages)


def run(config, workdir: str, *, allow_config_change: bool = False, progress: bool = True,
        step_hook=None) -> int:
  """Trains; returns the exit status (prints errors). `step_hook`: see `experiment.train`."""
  from fusionsam_jax import experiment
  from fusionsam_jax import training as T
  from fusionsam_jax.data import DatasetError
  from fusionsam_jax.models.sam.checkpoint import CheckpointError
  from fusionsam_jax.errors import WorkdirError
  from fusionsam_jax.training.checkpointing import CheckpointMismatchError, CheckpointRestoreError
  from fusionsam_jax.jit_utils import CompileClock
  clock = CompileClock()
  compiled_before = clock.snapshot()
  try:
    result = experiment.train(config, workdir, allow_config_change=allow_config_change,
                              progress=progress, step_hook=step_hook)
  except T.NonFiniteLossError as e:
    # The learning rate is part of the workdir's config: changing it needs the flag.
    lr = f"--config.train.stages.{getattr(e, 'stage', None) or '<stage>'}.lr"
    print(f"error: training stopped: {e}. Check the data, or resume from that checkpoint with "
          f"a lower learning rate: the same command with {lr}=<lower> "
          "--allow_config_change.", file=sys.stderr)
    return EXIT_NONFINITE
  except (T.ConfigMismatchError, CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  except WorkdirError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except (experiment.SetupError, CheckpointError, CheckpointRestoreError, DatasetError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  except OSError as e:  # disk full, permissions, ...: the file and the reason
    print(f"error: {_os_error(e)}", file=sys.stderr)
    return EXIT_ERROR
  stages = ", ".join(
      f"{k} " + ("skipped" if v["skipped"] else "%.0f s" % v["seconds"])
      for k, v in result.stages.items())
  print(f"done in {result.seconds:.1f} s ({stages})", flush=True)
  c = CompileClock.since(compiled_before, clock.snapshot())
  print(f"compilation: {c['programs']:.0f} programs, "
        f"{c['trace_s'] + c['lower_s'] + c['backend_s']:.1f} s (tracing {c['trace_s']:.1f}, "
        f"lowering {c['lower_s']:.1f}, XLA compile or cache load {c['backend_s']:.1f}, of "
        f"which cache reads {c['cache_read_s']:.1f}; {c['cache_hits']:.0f} of "
        f"{c['cache_requests']:.0f} from the persistent cache)", flush=True)
  return 0


def _os_error(e: OSError) -> str:
  import errno
  if e.errno == errno.ENOSPC:
    where = f" writing {e.filename}" if e.filename else ""
    return (f"no space left on the device{where}; free some space (or move --workdir), then "
            "re-run the same command: it resumes")
  return str(e)


def define_flags() -> dict:
  """The CLI's flags (defined only when run as a program, so that importing this module
  next to the other CLIs does not clash on --config)."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "experiment config file (configs/*.py[:variant,...])"),
      "workdir": flags.DEFINE_string("workdir", None, "run folder: checkpoints, logs, caches"),
      "allow_config_change": flags.DEFINE_bool(
          "allow_config_change", False, "continue in a workdir made with a different config "
          "(the old config.json is kept as config.<time>.json)"),
      "progress": flags.DEFINE_bool("progress", True, "tqdm progress bars"),
      "compilation_cache": flags.DEFINE_string(
          "compilation_cache", DEFAULT_COMPILATION_CACHE, "JAX persistent compilation cache "
          "folder ('' = off): a second run loads its compiled steps"),
  }


def main(argv, f) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    return EXIT_USAGE
  try:  # a config file that does not load fails here (ml_collections defers the error)
    config = f["config"].value
    if config is not None:
      config.keys()
  except Exception as e:  # noqa: BLE001
    print(f"error: --config: {one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  if config is None or not f["workdir"].value:
    print("error: --config and --workdir are required", file=sys.stderr)
    return EXIT_USAGE
  quiet_logs()
  enable_compilation_cache(f["compilation_cache"].value)
  from fusionsam_jax.config_lib import normalize_overrides
  return run(normalize_overrides(config), f["workdir"].value,
             allow_config_change=f["allow_config_change"].value, progress=f["progress"].value)


if __name__ == "__main__":
  reexec_with_huge_pages()
  _FLAGS = define_flags()
  app.run(lambda argv: sys.exit(main(argv, _FLAGS)), flags_parser=parse_flags_or_exit)
