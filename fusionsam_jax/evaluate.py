r"""Evaluate a trained FusionSAM checkpoint at full resolution.

    python -m fusionsam_jax.evaluate --config configs/mfnet.py --workdir runs/mfnet
    python -m fusionsam_jax.evaluate --workdir runs/mfnet --checkpoint latest --split test_night

Restores the segmentation stage's checkpoint (``--checkpoint best`` by val mIoU, the default;
``latest``; or a step number), runs the whole split through the eval loader (every test
pixel counted exactly once: images padded, padding masked out), accumulates one confusion
matrix and prints the per-class IoU table in the layout of the paper's Tables 1/2. For
saliency (VDT-2048) it also prints S-measure, MAE, E-measure and F-measure (adaptive / mean /
max) of the salient-class probability. Results go to ``WORKDIR/eval_<split>_<checkpoint>.json``
(written atomically).

Without ``--config`` the config stored in the workdir is used; with it, it must match that
config (evaluation settings such as ``--config.eval.batch_size`` may differ).

Exit status: 0 done; 1 no checkpoint / missing data / bad arguments; 4 config mismatch.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from fusionsam_jax.cli_common import DEFAULT_COMPILATION_CACHE, enable_compilation_cache

def run(config, workdir: str, checkpoint: str = "best", split: str | None = None) -> int:
  from fusionsam_jax import experiment, workdir as W
  from fusionsam_jax import training as T
  from fusionsam_jax.data import DatasetError
  from fusionsam_jax.cli_common import EXIT_CONFIG, EXIT_ERROR
  from fusionsam_jax.sam_checkpoint import CheckpointError
  try:
    which = experiment.parse_checkpoint_arg(checkpoint)
    if config is None:
      config = W.load_config(workdir)
    else:
      W.check_config_matches(config, workdir)
    experiment.evaluate(config, workdir, which, split or config.eval.split)
  except T.ConfigMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  except (experiment.SetupError, CheckpointError, DatasetError, FileNotFoundError, ValueError,
          T.CheckpointRestoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  return 0


def define_flags() -> dict:
  """Defined only when run as a program (importing next to train.py must not clash)."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "experiment config (default: the one stored in --workdir)"),
      "workdir": flags.DEFINE_string("workdir", None, "training run folder"),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP"),
      "split": flags.DEFINE_string("split", None, "split to evaluate (default: "
                                   "config.eval.split, normally test)"),
      "compilation_cache": flags.DEFINE_string(
          "compilation_cache", DEFAULT_COMPILATION_CACHE, "JAX persistent compilation cache "
          "folder ('' = off): a second run loads its compiled steps"),
  }


def main(argv, f) -> int:
  from fusionsam_jax.cli_common import quiet_logs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not f["workdir"].value:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  quiet_logs()
  enable_compilation_cache(f["compilation_cache"].value)
  return run(f["config"].value, f["workdir"].value, f["checkpoint"].value, f["split"].value)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: sys.exit(main(argv, _FLAGS)))
