#!/usr/bin/env python
"""Convert an official PyTorch SAM checkpoint (.pth) to a Flax/Orbax checkpoint.

  python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h

The variant (vit_h / vit_l / vit_b) is read off the tensor shapes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def define_flags(fv) -> dict:
  from fusionsam_jax.cli_common import converter_flags
  return converter_flags(fv, "SAM .pth", "auto|vit_h|vit_l|vit_b")


def _main(f, _) -> int:
  from fusionsam_jax.cli_common import run_converter
  from fusionsam_jax.models.sam.checkpoint import CheckpointError, convert_file
  from fusionsam_jax.models.sam.sam import preset_name
  return run_converter(f, convert_file, CheckpointError, preset_name)


def main(argv=None) -> int:
  from fusionsam_jax.cli_common import run_cli
  return run_cli(define_flags, _main, argv, prog="python tools/convert_sam_weights.py",
                 doc=__doc__, required=("checkpoint", "output"))


if __name__ == "__main__":
  from fusionsam_jax.cli_common import exit_now
  exit_now(main())
