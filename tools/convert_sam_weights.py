#!/usr/bin/env python
"""Convert an official PyTorch SAM checkpoint (.pth) to a Flax/Orbax checkpoint.

  python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h

The variant (vit_h / vit_l / vit_b) is read off the tensor shapes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def define_flags(fv) -> dict:
  from absl import flags
  return {
      "checkpoint": flags.DEFINE_string("checkpoint", None, "official SAM .pth file",
                                        flag_values=fv),
      "output": flags.DEFINE_string("output", None, "output directory", flag_values=fv),
      "model_type": flags.DEFINE_string("model_type", "auto", "auto|vit_h|vit_l|vit_b",
                                        flag_values=fv),
      "overwrite": flags.DEFINE_bool("overwrite", False, "replace an existing output (only a "
                                     "checkpoint folder this converter wrote)", flag_values=fv),
      "verbose": flags.DEFINE_bool("verbose", False, "on an error, also print what the "
                                   "libraries logged (tracebacks)", flag_values=fv),
  }


def _main(f, _) -> int:
  from fusionsam_jax.cli_common import captured_stderr
  from fusionsam_jax.sam_checkpoint import CheckpointError, convert_file
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
  from fusionsam_jax.models.sam.sam import preset_name
  print(f"converted {ckpt} ({preset_name(cfg) or 'custom'}) -> {out}")
  return 0


def main(argv=None) -> int:
  from fusionsam_jax.cli_common import run_cli
  return run_cli(define_flags, _main, argv, prog="python tools/convert_sam_weights.py",
                 doc=__doc__, required=("checkpoint", "output"))


if __name__ == "__main__":
  from fusionsam_jax.cli_common import exit_now
  exit_now(main())
