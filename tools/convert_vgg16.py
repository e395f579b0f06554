#!/usr/bin/env python
"""Convert a torchvision VGG16 state dict (.pth) into Flax params for the perceptual loss.

    python tools/convert_vgg16.py --weights vgg16-397923af.pth --output ckpt/vgg16.npz

The input is what ``torch.save(torchvision.models.vgg16(weights=...).state_dict(), path)``
writes (keys ``features.{0,2,5,...,28}.weight/bias``; ``classifier.*`` is ignored). It is
loaded with ``torch.load(weights_only=True)`` so no pickled code runs. The output .npz is
written atomically (temp file + rename) and read by
``fusionsam_jax.models.vgg.load_vgg16_params``. Errors print one line and exit non-zero.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusionsam_jax.cli import convert_vgg16, driver  # noqa: E402

main = convert_vgg16.main

if __name__ == "__main__":
  driver.main(convert_vgg16)
