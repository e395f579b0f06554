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

from fusionsam_jax.cli import driver, convert_sam2  # noqa: E402

main = convert_sam2.main

if __name__ == "__main__":
  driver.main(convert_sam2)
