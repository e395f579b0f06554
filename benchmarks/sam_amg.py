r"""Automatic mask generation speed: our `SamAutomaticMaskGenerator` vs the official one,
same weights, same image, same run.

  python benchmarks/sam_amg.py --out benchmarks/results/sam_amg_h100.json
  # CPU smoke run:
  python benchmarks/sam_amg.py --variant tiny --image_size 128 --points_per_side 4 \
      --repeats 1 --torchvision_standin --out /tmp/sam_amg_cpu.json

Default: vit_h with random weights, one 1024 x 1024 image, a 32 x 32 point grid,
points_per_batch 64, float32 at the highest matmul precision for both. Times
`generate(image)` end to end (embedding, decoding, filtering, NMS, RLE), median of
--repeats runs after one warm-up run (whose time, compilation included, is recorded as
first_call_s). Two scenarios: the official default thresholds, and "keep_all" (no IoU or
stability filter, so every one of the 3 x 1024 masks reaches NMS and encoding). Also records
how closely the two outputs agree (mask count, boxes).

--torchvision_standin replaces torchvision's batched_nms with a pure-torch one, for hosts
where torchvision does not import (the JSON says which was used). --variant tiny with a
small --image_size and --points_per_side checks the script on CPU. absl flags (``--help``);
``--scenarios`` is comma-separated.
"""

import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, flag_namespace, write_json  # noqa: E402
from fusionsam_jax.cli.driver import run_cli  # noqa: E402


def _standin_torchvision():
  import torch

  def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  def batched_nms(boxes, scores, idxs, iou_threshold):
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    areas = box_area(boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
      if suppressed[i]:
        continue
      keep.append(i)
      lt = torch.maximum(boxes[i, :2], boxes[:, :2])
      rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
      wh = (rb - lt).clamp(min=0)
      inter = wh[:, 0] * wh[:, 1]
      suppressed |= (inter / (areas[i] + areas - inter) > iou_threshold) & (idxs == idxs[i])
    return torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)

  from PIL import Image
  tv = types.ModuleType("torchvision")
  tr = types.ModuleType("torchvision.transforms")
  fn = types.ModuleType("torchvision.transforms.functional")
  fn.to_pil_image = lambda pic: Image.fromarray(np.asarray(pic))
  fn.resize = lambda img, size: img.resize((size[1], size[0]), Image.BILINEAR)
  ops = types.ModuleType("torchvision.ops")
  bx = types.ModuleType("torchvision.ops.boxes")
  bx.batched_nms, bx.box_area = batched_nms, box_area
  tv.transforms, tr.functional, tv.ops, ops.boxes = tr, fn, ops, bx
  sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                      "torchvision.transforms.functional": fn, "torchvision.ops": ops,
                      "torchvision.ops.boxes": bx})


def _official_sam(cfg, device):
  """The official model at a SamConfig's sizes, its default (random) initialisation."""
  import functools
  import torch
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  e = cfg.img_size // cfg.patch_size
  torch.manual_seed(0)
  sam = Sam(
      image_encoder=ImageEncoderViT(
          depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.img_size,
          mlp_ratio=4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
          num_heads=cfg.encoder_num_heads, patch_size=cfg.patch_size, qkv_bias=True,
          use_rel_pos=True, global_attn_indexes=cfg.encoder_global_attn_indexes,
          window_size=cfg.window_size, out_chans=cfg.prompt_embed_dim),
      prompt_encoder=PromptEncoder(
          embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
          input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=cfg.num_multimask_outputs,
          transformer=TwoWayTransformer(depth=cfg.decoder_transformer_depth,
                                        embedding_dim=cfg.prompt_embed_dim,
                                        mlp_dim=cfg.decoder_mlp_dim,
                                        num_heads=cfg.decoder_num_heads),
          transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3,
          iou_head_hidden_dim=cfg.iou_head_hidden_dim),
      pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
  with torch.no_grad():  # SAM zero-initialises these: give them values
    for name, p in sam.named_parameters():
      if "rel_pos" in name or "pos_embed" in name:
        p.copy_(0.02 * torch.randn(p.shape))
  return sam.eval().to(device)


def _image(size, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  img = np.full((size, size, 3), 127, np.uint8)
  for _ in range(12):
    cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 20, size / 4)]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
  return img


def _timed(fn, repeats):
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, {"first_call_s": first, "runs_s": times, "median_s": float(np.median(times))}


def _agreement(ours, theirs):
  boxes_o = sorted(tuple(r["bbox"]) for r in ours)
  boxes_t = sorted(tuple(r["bbox"]) for r in theirs)
  same = len(set(boxes_o) & set(boxes_t))
  return {"n_ours": len(ours), "n_official": len(theirs),
          "same_boxes": same, "boxes_equal": boxes_o == boxes_t}


def _define(fv):
  from absl import flags
  return {
      "out": flags.DEFINE_string("out", None, "JSON output path", flag_values=fv),
      "variant": flags.DEFINE_string("variant", "vit_h", "vit_h | vit_l | vit_b | tiny",
                                     flag_values=fv),
      "image_size": flags.DEFINE_integer("image_size", 1024, "side of the square test image",
                                         flag_values=fv),
      "points_per_side": flags.DEFINE_integer("points_per_side", 32, "point grid side",
                                              flag_values=fv),
      "points_per_batch": flags.DEFINE_integer("points_per_batch", 64, "points per decoder "
                                               "call", flag_values=fv),
      "repeats": flags.DEFINE_integer("repeats", 3, "timed runs after the warm-up run",
                                      flag_values=fv),
      "scenarios": flags.DEFINE_list("scenarios", ["default", "keep_all"],
                                     "default | keep_all", flag_values=fv),
      "skip_official": flags.DEFINE_bool("skip_official", False, "time ours only",
                                         flag_values=fv),
      "torchvision_standin": flags.DEFINE_bool(
          "torchvision_standin", False,
          "pure-torch batched_nms for hosts where torchvision does not import", flag_values=fv),
  }


def _run(f, _) -> int:
  args = flag_namespace(f)
  import jax
  from fusionsam_jax.models.sam.amg import SamAutomaticMaskGenerator
  from fusionsam_jax.models.sam.predictor import LoadedSam
  from fusionsam_jax.models.sam.sam import SAM_PRESETS
  from fusionsam_jax.models.sam.checkpoint import convert_state_dict

  if args.variant not in SAM_PRESETS:
    print(f"error: --variant {args.variant!r}: expected one of {', '.join(SAM_PRESETS)}",
          file=sys.stderr)
    return 1
  try:
    import torch
    if args.torchvision_standin:
      _standin_torchvision()
    import segment_anything  # noqa: F401  (its __init__ imports torchvision)
    from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
  except Exception as e:  # torch, torchvision or segment_anything missing / broken
    print(f"error: the official generator does not import ({type(e).__name__}: {e}); "
          "install segment-anything==1.0 with torch + torchvision, or pass "
          "--torchvision_standin", file=sys.stderr)
    return 1

  cfg = SAM_PRESETS[args.variant]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tsam = _official_sam(cfg, device)
  sd = {k: v.detach().cpu().numpy() for k, v in tsam.state_dict().items()}
  _, params = convert_state_dict(sd, cfg)
  sam = LoadedSam(cfg, jax.device_put(params))
  image = _image(args.image_size)

  scenarios = {"default": {}, "keep_all": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)}
  env = environment()
  env["segment_anything"] = "1.0"
  env["torch_device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  env["official_nms"] = "standin (pure torch)" if args.torchvision_standin else "torchvision"
  try:
    import torchvision
    env["torchvision"] = getattr(torchvision, "__version__", "standin")
  except Exception:
    pass
  result = {"benchmark": "sam_amg", "environment": env,
            "config": {"variant": args.variant, "image_size": args.image_size,
                       "points_per_side": args.points_per_side,
                       "points_per_batch": args.points_per_batch, "repeats": args.repeats,
                       "weights": "random (official init; rel-pos / pos_embed 0.02 randn)",
                       "precision": "float32, jax matmul precision highest; torch fp32"},
            "results": {}}
  for name in args.scenarios:
    if name not in scenarios:
      print(f"error: --scenarios: unknown {name!r} (default, keep_all)", file=sys.stderr)
      return 1
    kw = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
              output_mode="binary_mask", **scenarios[name])
    entry = {"generator_kwargs": kw}
    print(f"{name}: timing ours ...", flush=True)
    with jax.default_matmul_precision("highest"):
      gen = SamAutomaticMaskGenerator(sam, **kw)
      ours, entry["ours"] = _timed(lambda: gen.generate(image), args.repeats)
    entry["ours"]["n_masks"] = len(ours)
    if not args.skip_official:
      ogen = OfficialGenerator(tsam, **kw)

      def run_official():
        with torch.no_grad():
          out = ogen.generate(image)
        if device == "cuda":
          torch.cuda.synchronize()
        return out

      print(f"{name}: timing official ...", flush=True)
      theirs, entry["official"] = _timed(run_official, args.repeats)
      entry["official"]["n_masks"] = len(theirs)
      entry["speedup"] = entry["official"]["median_s"] / entry["ours"]["median_s"]
      entry["agreement"] = _agreement(ours, theirs)
    result["results"][name] = entry
    write_json(args.out, result)  # after each scenario: a run cut short keeps what it measured
    print(f"{name}: ours {entry['ours']['median_s']:.3f} s"
          + (f", official {entry['official']['median_s']:.3f} s, "
             f"{entry['ours']['n_masks']} / {entry['official']['n_masks']} masks"
             if "official" in entry else ""), flush=True)
  write_json(args.out, result)
  print(f"wrote {args.out}")
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/sam_amg.py", doc=__doc__,
                 required=("out",))


if __name__ == "__main__":
  sys.exit(main())
