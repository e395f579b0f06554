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
  from fusionsam_jax.cli_common import converter_flags
  return converter_flags(fv, "SAM 2 .pt", "auto|hiera_t|hiera_s|hiera_b+|hiera_l")


def _main(f, _) -> int:
  from fusionsam_jax.cli_common import run_converter
  from fusionsam_jax.models.sam2.checkpoint import CheckpointError, convert_file
  from fusionsam_jax.models.sam2.sam2 import preset_name
  return run_converter(f, convert_file, CheckpointError, preset_name)


def main(argv=None) -> int:
  from fusionsam_jax.cli_common import run_cli
  return run_cli(define_flags, _main, argv, prog="python tools/convert_sam2_weights.py",
                 doc=__doc__, required=("checkpoint", "output"))


if __name__ == "__main__":
  from fusionsam_jax.cli_common import exit_now
  exit_now(main())
