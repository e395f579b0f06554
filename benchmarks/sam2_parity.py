"""SAM 2.1 hiera_l parity of the Flax port with Meta's `sam2` 1.1.0, on the GPU, random weights.

  python benchmarks/sam2_parity.py --out benchmarks/results/sam2_parity_hiera_l.json
  # CPU smoke run:
  python benchmarks/sam2_parity.py --variant tiny --cpu --out /tmp/sam2_parity_tiny_cpu.json

Builds Meta's model with every parameter random (tests/sam2_reference.py), saves it as a real
.pt, converts it with tools/convert_sam2_weights.py, and compares (max |jax - torch| /
max |torch|): every trunk level, every neck level, the projected high-res features and the
image embedding; sparse / dense prompt embeddings and low-res masks / IoU / object scores
for point, box, mask and combined prompts, multimask on and off (decoder fed the same
features on both sides); and `Sam2ImagePredictor` against `SAM2ImagePredictor` end to end
from a uint8 image. Both sides float32: PyTorch with TF32 off, JAX at
`default_matmul_precision("highest")`. `--variant tiny --cpu` is a smoke test. absl flags
(``--help``).
"""

import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from benchmarks.common import environment, flag_namespace, write_json  # noqa: E402
from fusionsam_jax.cli.driver import run_cli  # noqa: E402


def _define(fv):
  from absl import flags
  return {
      "variant": flags.DEFINE_string("variant", "hiera_l", "SAM 2 preset", flag_values=fv),
      "out": flags.DEFINE_string("out", None, "JSON path", flag_values=fv),
      "workdir": flags.DEFINE_string("workdir", None, "where the .pt and the converted "
                                     "checkpoint go (unset: a new temporary folder)",
                                     flag_values=fv),
      "cpu": flags.DEFINE_bool("cpu", False, "run both sides on CPU", flag_values=fv),
  }


def _run(f, _):
  args = flag_namespace(f)
  if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  import jax.numpy as jnp
  import torch
  import sam2_reference as ref
  from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint
  from fusionsam_jax.models.sam2.sam2 import Sam2, Sam2Features
  from fusionsam_jax.models.sam2.predictor import Sam2ImagePredictor

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
  work = args.workdir or tempfile.mkdtemp()
  os.makedirs(work, exist_ok=True)
  tm = ref.build_torch_sam2(args.variant, seed=0, device="cpu", prefer_real_torchvision=True)
  pt = os.path.join(work, f"sam2.1_{args.variant}_random.pt")
  ref.save_checkpoint(tm, pt)
  res = ref.run_converter(pt, os.path.join(work, "ckpt"), "--overwrite")
  if res.returncode:
    raise SystemExit(res.stderr.strip())
  cfg, params = load_sam2_checkpoint(os.path.join(work, "ckpt"))
  tm = tm.to(dev)
  out = {"env": environment(), "variant": f"sam2.1_{args.variant}", "device": dev,
         "weights": "random (all params)", "metric": "max|jax - torch| / max|torch|",
         "tolerance": 1e-4, "results": {}}
  try:
    import sam2
    out["env"]["sam2"] = getattr(sam2, "__version__", "1.1.0 (no __version__)")
  except ImportError:
    pass
  r = out["results"]
  save = lambda: write_json(args.out, out)
  nhwc = lambda t: t.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
  T = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
  rng = np.random.default_rng(0)
  s, e, d = cfg.image_size, cfg.image_embedding_size, cfg.d_model
  x = rng.normal(size=(1, 3, s, s)).astype(np.float32)
  model = Sam2(cfg)

  # Features at every level.
  with torch.no_grad():
    t_trunk = [nhwc(a) for a in tm.image_encoder.trunk(T(x))]
    t_fpn = [nhwc(a) for a in tm.image_encoder(T(x))["backbone_fpn"]]
    t_proj = [nhwc(a) for a in tm.forward_image(T(x))["backbone_fpn"]]
  t_embed = t_proj[2] + tm.no_mem_embed.detach().cpu().numpy()[0]

  def run_enc(m, x):
    return m.image_encoder.trunk(x), m.backbone(x), m.encode(x)

  with jax.default_matmul_precision("highest"):
    trunk, fpn, feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method=run_enc))(
        params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  for i, (g, w) in enumerate(zip(trunk, t_trunk)):
    r[f"trunk_level{i}"] = ref.rel_err(g, w)
  for i, (g, w) in enumerate(zip(fpn, t_fpn)):
    r[f"neck_level{i}"] = ref.rel_err(g, w)
  r["high_res_s0"] = ref.rel_err(feats.high_res_feats[0], t_proj[0])
  r["high_res_s1"] = ref.rel_err(feats.high_res_feats[1], t_proj[1])
  r["image_embed"] = ref.rel_err(feats.image_embed, t_embed)
  print({k: f"{v:.2e}" for k, v in r.items()}, flush=True)
  save()

  # Prompts and decoder, both fed the torch features.
  coords = rng.uniform(0, s, (1, 4, 2)).astype(np.float32)
  labels = np.array([[1, 0, 1, -1]], np.int32)
  boxes = np.array([[0.1 * s, 0.2 * s, 0.7 * s, 0.9 * s]], np.float32)
  masks = rng.normal(0, 5, (1, 1, 4 * e, 4 * e)).astype(np.float32)
  jfeats = Sam2Features(jnp.asarray(t_embed), (jnp.asarray(t_proj[0]), jnp.asarray(t_proj[1])))
  pe, dec = tm.sam_prompt_encoder, tm.sam_mask_decoder
  cases = {"points": dict(p=True), "box": dict(b=True), "mask": dict(m=True),
           "points+box+mask": dict(p=True, b=True, m=True)}
  with torch.no_grad():
    hr = [dec.conv_s0(T(t_fpn[0].transpose(0, 3, 1, 2))),
          dec.conv_s1(T(t_fpn[1].transpose(0, 3, 1, 2)))]
  for name, c in cases.items():
    kw = dict(point_coords=jnp.asarray(coords) if c.get("p") else None,
              point_labels=jnp.asarray(labels) if c.get("p") else None,
              boxes=jnp.asarray(boxes) if c.get("b") else None,
              mask_inputs=jnp.asarray(masks.transpose(0, 2, 3, 1)) if c.get("m") else None)

    def run_dec(m, f):
      return (m.prompt_embeddings(**kw),
              {multi: m.decode(f, **kw, multimask_output=multi) for multi in (True, False)})

    with jax.default_matmul_precision("highest"):
      (sparse, dense), got = jax.jit(
          lambda p, f: model.apply({"params": p}, f, method=run_dec))(params, jfeats)
    with torch.no_grad():
      t_sparse, t_dense = pe((T(coords), T(labels)) if c.get("p") else None,
                             T(boxes) if c.get("b") else None, T(masks) if c.get("m") else None)
      assert sparse.shape == tuple(t_sparse.shape)
      if sparse.shape[1]:
        r[f"{name}/sparse"] = ref.rel_err(sparse, t_sparse.cpu().numpy())
      r[f"{name}/dense"] = ref.rel_err(dense, nhwc(t_dense))
      for multi in (True, False):
        tl, ti, _, to = dec(T(t_embed.transpose(0, 3, 1, 2)), pe.get_dense_pe(), t_sparse,
                            t_dense, multimask_output=multi, repeat_image=False,
                            high_res_features=hr)
        low, iou, obj = got[multi]
        tag = f"{name}/multimask_{'on' if multi else 'off'}"
        r[f"{tag}/low_res_masks"] = ref.rel_err(low, tl.cpu().numpy())
        r[f"{tag}/iou"] = ref.rel_err(iou, ti.cpu().numpy())
        r[f"{tag}/object_score"] = ref.rel_err(obj, to.cpu().numpy())
    print(name, {k: f"{v:.2e}" for k, v in r.items() if k.startswith(name + "/")}, flush=True)
    save()

  # The predictors end to end from a uint8 image.
  _, ip = ref.official()
  t_pred = ip.SAM2ImagePredictor(tm)
  t_pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
  h, w = (3 * s // 4, s) if args.variant != "tiny" else (150, 200)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  t_pred.set_image(image)
  with jax.default_matmul_precision("highest"):
    pred = Sam2ImagePredictor(cfg, params)
    pred.set_image(image)
    r["predictor/image_embed"] = ref.rel_err(pred.get_image_embedding(),
                                             nhwc(t_pred._features["image_embed"]))
    pts = np.array([[w * 0.3, h * 0.6], [w * 0.7, h * 0.2], [w * 0.5, h * 0.5]])
    lab = np.array([1, 0, 1])
    box = np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])
    for name, case in {"points": dict(point_coords=pts, point_labels=lab),
                       "box": dict(box=box),
                       "points+box": dict(point_coords=pts[:2], point_labels=lab[:2],
                                          box=box)}.items():
      for multi in (True, False):
        tmk, ti, tl = t_pred.predict(**case, multimask_output=multi, return_logits=True)
        m, i, l = pred.predict(**case, multimask_output=multi, return_logits=True)
        tag = f"predictor/{name}/multimask_{'on' if multi else 'off'}"
        r[f"{tag}/masks"] = ref.rel_err(m, tmk)
        r[f"{tag}/iou"] = ref.rel_err(i, ti)
        r[f"{tag}/low_res"] = ref.rel_err(l, tl)
  out["max_rel_err"] = max(r.values())
  out["worst"] = max(r, key=r.get)
  out["pass"] = out["max_rel_err"] <= out["tolerance"]
  save()
  print(f"max rel err {out['max_rel_err']:.2e} ({out['worst']}); "
        f"{'PASS' if out['pass'] else 'FAIL'} at {out['tolerance']}", flush=True)
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/sam2_parity.py", doc=__doc__,
                 required=("out",))


if __name__ == "__main__":
  sys.exit(main())
