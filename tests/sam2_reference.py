"""Helpers to run Meta's `sam2` 1.1.0 as the reference in tests.

`sam2` imports torchvision only for `Resize`, `Normalize`, `ToTensor` (in
`sam2.utils.transforms`) and `batched_nms` / `box_area` (automatic mask generator). The CUDA
torchvision wheels do not import beside the CPU torch, so a small stand-in is registered:
its `Resize` is torchvision's tensor path (`F.interpolate(bilinear, align_corners=False,
antialias=True)`), its `Normalize` is `(x - mean) / std`, `ToTensor` is HWC uint8 ->
CHW float / 255; the ops raise (nothing here uses them).
"""

import os
import subprocess
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}

# The tiny test model, as hydra overrides of the hiera_t config: it matches
# `SAM2_PRESETS["tiny"]` (q-pooling into windows, window padding at stages 3 and 4, a global
# block, a bicubic-resized background position embedding, two heads in the last stage).
TINY_OVERRIDES = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,2,3,1]",
    "++model.image_encoder.trunk.global_att_blocks=[4]",
    "++model.image_encoder.trunk.window_spec=[8,4,6,3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[5,5]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
]


def _install_stub_torchvision():
  """Registers the stand-in, adding to (not replacing) any torchvision modules already
  registered (tests/sam_reference.py registers `torchvision.transforms.functional`)."""
  existing = sys.modules.get("torchvision.transforms")
  if existing is not None and hasattr(existing, "Resize"):
    return
  import torch
  import torch.nn.functional as F

  class ToTensor:
    def __call__(self, pic):
      a = np.asarray(pic)
      return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div(255.0)

  class Resize(torch.nn.Module):
    def __init__(self, size):
      super().__init__()
      self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear",
                           align_corners=False, antialias=True).squeeze(0)

  class Normalize(torch.nn.Module):
    def __init__(self, mean, std):
      super().__init__()
      self.mean = [float(m) for m in mean]
      self.std = [float(s) for s in std]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
      std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
      return (x - mean) / std

  def _unused(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: ops are not available in tests")

  mods = {}
  for name in ("torchvision", "torchvision.transforms", "torchvision.ops",
               "torchvision.ops.boxes"):
    mods[name] = sys.modules.get(name) or types.ModuleType(name)
  tv, tr = mods["torchvision"], mods["torchvision.transforms"]
  ops, boxes = mods["torchvision.ops"], mods["torchvision.ops.boxes"]
  tr.ToTensor, tr.Resize, tr.Normalize = ToTensor, Resize, Normalize
  if not hasattr(boxes, "batched_nms"):  # keep sam_reference's NMS stand-in when present
    boxes.batched_nms = boxes.box_area = _unused
  tv.transforms, tv.ops, ops.boxes = tr, ops, boxes
  sys.modules.update(mods)


def official(prefer_real_torchvision=False):
  """Imports `sam2` (build_sam, the image predictor) with the torchvision stand-in, or with the
  real torchvision when asked and it imports (GPU hosts with a matching CUDA build)."""
  if prefer_real_torchvision and "torchvision" not in sys.modules:
    try:
      import torchvision.ops.boxes  # noqa: F401
      import torchvision.transforms  # noqa: F401
    except Exception:  # absent, or built for another torch
      for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
  _install_stub_torchvision()
  import sam2.build_sam as build_sam
  import sam2.sam2_image_predictor as image_predictor
  return build_sam, image_predictor


def build_torch_sam2(name, seed=0, randomize=True, device="cpu", prefer_real_torchvision=False):
  """Meta's SAM 2.1 model (`name` in CONFIGS or "tiny"), every parameter and buffer random.

  The official init leaves LayerNorms at identity, biases and position embeddings at zero
  and the memory tokens tiny; every parameter is redrawn so the parity tests see every term
  (the buffers, the prompt encoder's Gaussian matrix, are random from the start).
  """
  import torch

  build_sam, _ = official(prefer_real_torchvision)
  torch.manual_seed(seed)
  config = CONFIGS["hiera_t" if name == "tiny" else name]
  overrides = TINY_OVERRIDES if name == "tiny" else []
  model = build_sam.build_sam2(config, ckpt_path=None, device=device,
                               hydra_overrides_extra=list(overrides))
  if not randomize:
    return model.eval()
  g = torch.Generator().manual_seed(seed + 1)
  embeddings = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
                if isinstance(mod, torch.nn.Embedding)}
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif n.endswith(".weight") and p.ndim == 1:  # LayerNorm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif n in embeddings:
        p.copy_(torch.randn(p.shape, generator=g))
      elif not n.endswith(".weight"):  # free tensors: pos_embed, no_mem_embed, ...
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:  # Linear / Conv weights: unit-variance outputs
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
  return model.eval()


def save_checkpoint(model, path):
  """Saves as the official release does: {"model": state_dict}."""
  import torch
  torch.save({"model": model.state_dict()}, path)


def run_converter(pt, out, *extra):
  """Runs tools/convert_sam2_weights.py as a user would; returns CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_sam2_weights.py"),
                         "--checkpoint", str(pt), "--output", str(out), *extra],
                        capture_output=True, text=True, cwd=REPO)


def converted_random(tmp, name="tiny", seed=0):
  """A random official `name` model saved as a real .pt in `tmp` and converted there by the
  converter CLI (as a user would): -> (torch model, converted checkpoint dir)."""
  tm = build_torch_sam2(name, seed=seed)
  pt = os.path.join(str(tmp), f"sam2_{name}.pt")
  save_checkpoint(tm, pt)
  res = run_converter(pt, os.path.join(str(tmp), "ckpt"))
  assert res.returncode == 0, res.stderr
  return tm, os.path.join(str(tmp), "ckpt")


def assert_every_tensor_random(model):
  """Raises AssertionError when a floating tensor of `model.state_dict()` is constant."""
  from sam_reference import assert_every_tensor_random as check
  check(model)


def rel_err(a, b):
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
