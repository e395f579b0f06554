#!/usr/bin/env python
"""Convert an official PyTorch SAM checkpoint (.pth) to a Flax/Orbax checkpoint.

  python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h

The variant (vit_h / vit_l / vit_b) is read off the tensor shapes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  class _Formatter(argparse.RawDescriptionHelpFormatter,
                   argparse.ArgumentDefaultsHelpFormatter):
    pass
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
  parser.add_argument("--checkpoint", required=True, help="official SAM .pth file")
  parser.add_argument("--output", required=True, help="output directory")
  parser.add_argument("--model-type", default="auto", help="auto|vit_h|vit_l|vit_b")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  from fusionsam_jax.sam_checkpoint import CheckpointError, convert_file
  try:
    cfg, out = convert_file(args.checkpoint, args.output, args.model_type, args.overwrite)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  from fusionsam_jax.models.sam.sam import preset_name
  print(f"converted {args.checkpoint} ({preset_name(cfg) or 'custom'}) -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
