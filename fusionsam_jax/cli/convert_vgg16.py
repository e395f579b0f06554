"""Convert a torchvision VGG16 state dict (.pth) into Flax params for the perceptual loss.

    python tools/convert_vgg16.py --weights vgg16-397923af.pth --output ckpt/vgg16.npz

The input is what ``torch.save(torchvision.models.vgg16(weights=...).state_dict(), path)``
writes (keys ``features.{0,2,5,...,28}.weight/bias``; ``classifier.*`` is ignored). It is
loaded with ``torch.load(weights_only=True)`` so no pickled code runs. The output .npz is
written atomically (temp file + rename) and read by
``fusionsam_jax.models.vgg.load_vgg16_params``. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver

REQUIRED = ("weights", "output")


def define(fv) -> dict:
  return {
      "weights": flags.DEFINE_string("weights", None, "torchvision VGG16 state dict (.pth)",
                                     flag_values=fv),
      "output": flags.DEFINE_string("output", None, "output .npz for load_vgg16_params",
                                    flag_values=fv),
  }


def body(f, args) -> int:
  from fusionsam_jax.models import vgg
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  try:
    sd = vgg.read_torch_state_dict(f["weights"].value)
  except RuntimeError as e:   # PyTorch missing
    raise ValueError(str(e)) from None
  vgg.save_vgg16_params(vgg.params_from_torch_state_dict(sd), f["output"].value)
  print(f"wrote {f['output'].value} (13 VGG16 conv layers)")
  return 0


def main(argv=None) -> int:
  return driver.run(sys.modules[__name__], argv)
