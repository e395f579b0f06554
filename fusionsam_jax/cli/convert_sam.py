"""Convert an official PyTorch SAM checkpoint (.pth) to a Flax/Orbax checkpoint.

  python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h

The variant (vit_h / vit_l / vit_b) is read off the tensor shapes.
"""

from __future__ import annotations

import sys

from fusionsam_jax.cli import driver

REQUIRED = ("checkpoint", "output")
EXIT_NOW = True


def define(fv) -> dict:
  return driver.converter_flags(fv, "SAM .pth", "auto|vit_h|vit_l|vit_b")


def body(f, args) -> int:
  from fusionsam_jax.models.sam.checkpoint import CheckpointError, convert_file
  from fusionsam_jax.models.sam.sam import preset_name
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  return driver.run_converter(f, convert_file, CheckpointError, preset_name)


def main(argv=None) -> int:
  return driver.run(sys.modules[__name__], argv)
