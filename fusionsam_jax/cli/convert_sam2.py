"""Convert a SAM 2 / SAM 2.1 PyTorch checkpoint (.pt) to a Flax/Orbax checkpoint (image path).

  python tools/convert_sam2_weights.py --checkpoint sam2.1_hiera_large.pt \
      --output ckpt/sam2.1_hiera_l

The variant (hiera_t / hiera_s / hiera_b+ / hiera_l) is read off the tensor shapes; the video
memory tensors are skipped.
"""

from __future__ import annotations

import sys

from fusionsam_jax.cli import driver

REQUIRED = ("checkpoint", "output")
EXIT_NOW = True


def define(fv) -> dict:
  return driver.converter_flags(fv, "SAM 2 .pt", "auto|hiera_t|hiera_s|hiera_b+|hiera_l")


def body(f, args) -> int:
  from fusionsam_jax.models.sam2.checkpoint import CheckpointError, convert_file
  from fusionsam_jax.models.sam2.sam2 import preset_name
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  return driver.run_converter(f, convert_file, CheckpointError, preset_name)


def main(argv=None) -> int:
  return driver.run(sys.modules[__name__], argv)
