"""Helpers to run the official PyTorch `segment_anything` as the reference in tests.

`segment_anything/__init__.py` imports torchvision (no CPU wheel here), so the modeling code
is loaded through an empty package whose `__path__` is the installed folder. For the official
`SamPredictor`, a stand-in `torchvision.transforms.functional` provides the two functions it
uses on the PIL path (`to_pil_image`, and `resize`, which for PIL images is PIL's bilinear
resize in torchvision).
"""

import importlib.util
import os
import subprocess
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_stub_torchvision():
  if "torchvision.transforms.functional" in sys.modules:
    return
  from PIL import Image

  def to_pil_image(pic):
    return Image.fromarray(np.asarray(pic))

  def resize(img, size):
    return img.resize((size[1], size[0]), Image.BILINEAR)

  tv = types.ModuleType("torchvision")
  tr = types.ModuleType("torchvision.transforms")
  fn = types.ModuleType("torchvision.transforms.functional")
  fn.to_pil_image, fn.resize = to_pil_image, resize
  tv.transforms, tr.functional = tr, fn
  sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                      "torchvision.transforms.functional": fn})


def official():
  """Imports `segment_anything` (modeling, predictor) without real torchvision."""
  if "segment_anything.modeling" not in sys.modules:
    spec = importlib.util.find_spec("segment_anything")
    pkg_dir = os.path.dirname(spec.origin)
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = [pkg_dir]
    sys.modules["segment_anything"] = pkg
    _install_stub_torchvision()
  import segment_anything.modeling as modeling
  import segment_anything.predictor as predictor
  return modeling, predictor


def build_torch_sam(cfg, seed=0, randomize=True):
  """Official SAM modules at the sizes of a `SamConfig`, every parameter random.

  `randomize=False` skips the re-randomisation (e.g. to read shapes on the meta device).
  """
  import functools
  import torch

  m, _ = official()
  torch.manual_seed(seed)
  e = cfg.img_size // cfg.patch_size
  sam = m.Sam(
      image_encoder=m.ImageEncoderViT(
          depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.img_size,
          mlp_ratio=4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
          num_heads=cfg.encoder_num_heads, patch_size=cfg.patch_size, qkv_bias=True,
          use_rel_pos=True, global_attn_indexes=cfg.encoder_global_attn_indexes,
          window_size=cfg.window_size, out_chans=cfg.prompt_embed_dim),
      prompt_encoder=m.PromptEncoder(
          embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
          input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
      mask_decoder=m.MaskDecoder(
          num_multimask_outputs=cfg.num_multimask_outputs,
          transformer=m.TwoWayTransformer(depth=cfg.decoder_transformer_depth,
                                          embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim,
                                          num_heads=cfg.decoder_num_heads),
          transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3,
          iou_head_hidden_dim=cfg.iou_head_hidden_dim),
      pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
  if not randomize:
    return sam.eval()
  # SAM zero-initialises rel-pos tables and pos_embed and LayerNorms start at identity:
  # randomise them so the parity test exercises every term.
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in sam.named_parameters():
      if "rel_pos" in name or "pos_embed" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
      elif name.endswith(".weight") and p.ndim == 1:  # LayerNorm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif "embed" in name and p.ndim == 2:  # nn.Embedding
        p.copy_(torch.randn(p.shape, generator=g))
  return sam.eval()


def assert_every_tensor_random(model):
  """Raises AssertionError when a floating tensor of `model.state_dict()` is constant (a
  zero / one init left in place: rel-pos tables, pos_embed, biases, LayerNorm scales)."""
  const = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and (t.numel() == 1 and float(t) in (0.0, 1.0)
                                         or t.numel() > 1 and float(t.float().std()) == 0.0)]
  assert not const, f"tensors left at a constant init: {const}"


def save_state_dict(sam, path):
  import torch
  torch.save(sam.state_dict(), path)


def run_converter(pth, out, *extra):
  """Runs tools/convert_sam_weights.py as a user would; returns CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_sam_weights.py"),
                         "--checkpoint", str(pth), "--output", str(out), *extra],
                        capture_output=True, text=True, cwd=REPO)


def rel_err(a, b):
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _install_stub_torchvision_ops():
  """`torchvision.ops.boxes.batched_nms` / `box_area` for the official generator, in torch.

  NMS as torchvision defines it: by decreasing score (stable for ties), dropping boxes whose
  IoU with a kept box is > iou_threshold; categories never suppress each other.
  """
  existing = sys.modules.get("torchvision.ops.boxes")
  if existing is not None and getattr(existing.batched_nms, "is_nms_stand_in", False):
    return
  import torch

  def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  def batched_nms(boxes, scores, idxs, iou_threshold):
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    areas = box_area(boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
      if suppressed[i]:
        continue
      keep.append(i)
      lt = torch.maximum(boxes[i, :2], boxes[:, :2])
      rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
      wh = (rb - lt).clamp(min=0)
      inter = wh[:, 0] * wh[:, 1]
      iou = inter / (areas[i] + areas - inter)
      suppressed |= (iou > iou_threshold) & (idxs == idxs[i])
    return torch.as_tensor(keep, dtype=torch.int64)

  batched_nms.is_nms_stand_in = True
  # Added to the stand-in modules already registered (tests/sam2_reference.py registers
  # placeholders for these ops), or new ones.
  tv = sys.modules["torchvision"]
  ops = sys.modules.get("torchvision.ops") or types.ModuleType("torchvision.ops")
  boxes_mod = existing or types.ModuleType("torchvision.ops.boxes")
  boxes_mod.batched_nms, boxes_mod.box_area = batched_nms, box_area
  ops.boxes = boxes_mod
  tv.ops = ops
  sys.modules.update({"torchvision.ops": ops, "torchvision.ops.boxes": boxes_mod})


def official_amg():
  """The official `SamAutomaticMaskGenerator` class (torchvision ops stood in)."""
  official()
  _install_stub_torchvision_ops()
  import segment_anything.automatic_mask_generator as amg
  return amg.SamAutomaticMaskGenerator
