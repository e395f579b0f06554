#!/usr/bin/env python
"""Convert a SAM 2 / SAM 2.1 PyTorch checkpoint (.pt) to a Flax/Orbax checkpoint (image path).

  python tools/convert_sam2_weights.py --checkpoint sam2.1_hiera_large.pt \
      --output ckpt/sam2.1_hiera_l

The variant (hiera_t / hiera_s / hiera_b+ / hiera_l) is read off the tensor shapes; the video
memory tensors are skipped.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def define_flags(fv) -> dict:
  from absl import flags
  return {
      "checkpoint": flags.DEFINE_string("checkpoint", None, "official SAM 2 .pt file",
                                        flag_values=fv),
      "output": flags.DEFINE_string("output", None, "output directory", flag_values=fv),
      "model_type": flags.DEFINE_string("model_type", "auto",
                                        "auto|hiera_t|hiera_s|hiera_b+|hiera_l", flag_values=fv),
      "overwrite": flags.DEFINE_bool("overwrite", False, "replace an existing output (only a "
                                     "checkpoint folder this converter wrote)", flag_values=fv),
      "verbose": flags.DEFINE_bool("verbose", False, "on an error, also print what the "
                                   "libraries logged (tracebacks)", flag_values=fv),
  }


def _main(f, _) -> int:
  from fusionsam_jax.cli_common import captured_stderr
  from fusionsam_jax.models.sam2.checkpoint import CheckpointError, convert_file
  ckpt = f["checkpoint"].value
  error = None
  with captured_stderr() as log:
    try:
      cfg, out = convert_file(ckpt, f["output"].value, f["model_type"].value,
                              f["overwrite"].value)
    except CheckpointError as e:
      error = e
  if error is None or f["verbose"].value:
    sys.stderr.write(log.text)   # warnings of a good run; tracebacks only with --verbose
  if error is not None:
    print(f"error: {error}", file=sys.stderr)
    return 1
  from fusionsam_jax.models.sam2.sam2 import preset_name
  print(f"converted {ckpt} ({preset_name(cfg) or 'custom'}) -> {out}")
  return 0


def main(argv=None) -> int:
  from fusionsam_jax.cli_common import run_cli
  return run_cli(define_flags, _main, argv, prog="python tools/convert_sam2_weights.py",
                 doc=__doc__, required=("checkpoint", "output"))


if __name__ == "__main__":
  from fusionsam_jax.cli_common import exit_now
  exit_now(main())
