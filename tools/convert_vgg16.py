#!/usr/bin/env python
"""Convert a torchvision VGG16 state dict (.pth) into Flax params for the perceptual loss.

    python tools/convert_vgg16.py --weights vgg16-397923af.pth --output ckpt/vgg16.npz

The input is what ``torch.save(torchvision.models.vgg16(weights=...).state_dict(), path)``
writes (keys ``features.{0,2,5,...,28}.weight/bias``; ``classifier.*`` is ignored). It is
loaded with ``torch.load(weights_only=True)`` so no pickled code runs. The output .npz is
written atomically (temp file + rename) and read by
``fusionsam_jax.models.vgg.load_vgg16_params``. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusionsam_jax.models.vgg import (  # noqa: E402
    params_from_torch_state_dict, save_vgg16_params)


def read_state_dict(path: str) -> dict:
  """Load ``path`` with torch (weights only) -> {key: float32 numpy array}. Raises."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  try:
    import torch
  except ImportError:
    raise RuntimeError("PyTorch is needed to read .pth files: pip install torch "
                       "(the 'convert' extra)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for bad / truncated files
    full = str(e)
    msg = full.splitlines()[0] if full else type(e).__name__
    if "Weights only load failed" in msg and "GLOBAL" in full:
      msg = "not a plain tensor checkpoint; refusing to unpickle arbitrary objects"
    elif "Weights only load failed" in msg:
      msg = "unpickling failed: not a PyTorch file"
    elif len(msg) > 160:
      msg = msg[:157] + "..."
    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({msg})") from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
    raise ValueError(f"{path} does not hold a state dict of tensors "
                     f"(found {type(obj).__name__})")
  from fusionsam_jax.models.sam.checkpoint import CheckpointError, tensor_to_numpy
  sd = {}
  for k, v in obj.items():
    if isinstance(k, str) and k.startswith("features."):
      try:   # NaN / Inf, int / bool / complex, sparse, empty: refused naming the key
        sd[k] = tensor_to_numpy(torch, path, k, v)
      except CheckpointError as e:
        raise ValueError(str(e)) from None
  if not sd:
    raise ValueError(f"{path} has no 'features.*' tensors: not a torchvision VGG16 "
                     f"state dict (first keys: {', '.join(list(obj)[:3])})")
  return sd


def define_flags(fv) -> dict:
  from absl import flags
  return {
      "weights": flags.DEFINE_string("weights", None, "torchvision VGG16 state dict (.pth)",
                                     flag_values=fv),
      "output": flags.DEFINE_string("output", None, "output .npz for load_vgg16_params",
                                    flag_values=fv),
  }


def _main(f, _) -> int:
  try:
    sd = read_state_dict(f["weights"].value)
    params = params_from_torch_state_dict(sd)
    save_vgg16_params(params, f["output"].value)
  except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {f['output'].value} (13 VGG16 conv layers)")
  return 0


def main(argv=None) -> int:
  from fusionsam_jax.cli_common import run_cli
  return run_cli(define_flags, _main, argv, prog="python tools/convert_vgg16.py",
                 doc=__doc__, required=("weights", "output"))


if __name__ == "__main__":
  sys.exit(main())
