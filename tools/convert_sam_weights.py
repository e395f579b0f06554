#!/usr/bin/env python
"""Convert an official PyTorch SAM checkpoint (.pth) to a Flax/Orbax checkpoint.

  python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h

The variant (vit_h / vit_l / vit_b) is read off the tensor shapes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusionsam_jax.cli import driver, convert_sam  # noqa: E402

main = convert_sam.main

if __name__ == "__main__":
  driver.main(convert_sam)
