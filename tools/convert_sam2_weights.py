#!/usr/bin/env python
"""Convert a SAM 2 / SAM 2.1 PyTorch checkpoint (.pt) to a Flax/Orbax checkpoint (image path).

  python tools/convert_sam2_weights.py --checkpoint sam2.1_hiera_large.pt \
      --output ckpt/sam2.1_hiera_l

The variant (hiera_t / hiera_s / hiera_b+ / hiera_l) is read off the tensor shapes; the video
memory tensors are skipped.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="official SAM 2 .pt file")
  parser.add_argument("--output", required=True, help="output directory")
  parser.add_argument("--model-type", default="auto",
                      help="auto|hiera_t|hiera_s|hiera_b+|hiera_l")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  from fusionsam_jax.models.sam2.checkpoint import CheckpointError, convert_file
  try:
    cfg, out = convert_file(args.checkpoint, args.output, args.model_type, args.overwrite)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  from fusionsam_jax.models.sam2.sam2 import preset_name
  print(f"converted {args.checkpoint} ({preset_name(cfg) or 'custom'}) -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
