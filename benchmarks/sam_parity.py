"""vit_h parity of the Flax SAM with the official PyTorch SAM, on the GPU, random weights.

  python benchmarks/sam_parity.py --out benchmarks/results/sam_parity_vit_h.json
  # CPU smoke run:
  python benchmarks/sam_parity.py --variant tiny --out /tmp/sam_parity_tiny_cpu.json

Builds the official vit_h with every parameter random, saves it as a real .pth, converts it
with tools/convert_sam_weights.py, and compares image embeddings and low-res mask logits /
IoU predictions for point, box, mask and combined prompts, multimask on and off. Both sides
float32: PyTorch with TF32 off, JAX at `default_matmul_precision("highest")`. absl flags
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
      "variant": flags.DEFINE_string("variant", "vit_h", "SAM preset: vit_h | vit_l | vit_b | "
                                     "tiny", flag_values=fv),
      "out": flags.DEFINE_string("out", "benchmarks/results/sam_parity_vit_h.json", "JSON path",
                                 flag_values=fv),
      "workdir": flags.DEFINE_string("workdir", None, "where the .pth and the converted "
                                     "checkpoint go (unset: a new temporary folder)",
                                     flag_values=fv),
  }


def _run(f, _):
  args = flag_namespace(f)
  import jax
  import jax.numpy as jnp
  import torch
  import sam_reference as ref
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
  from fusionsam_jax.models.sam.checkpoint import load_sam_checkpoint

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  cfg = SAM_PRESETS[args.variant]
  work = args.workdir or tempfile.mkdtemp()
  os.makedirs(work, exist_ok=True)
  tsam = ref.build_torch_sam(cfg, seed=0)
  pth = os.path.join(work, f"sam_{args.variant}_random.pth")
  ref.save_state_dict(tsam, pth)
  res = ref.run_converter(pth, os.path.join(work, "ckpt"))
  if res.returncode:
    raise SystemExit(res.stderr)
  _, params = load_sam_checkpoint(os.path.join(work, "ckpt"))
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tsam = tsam.to(dev)
  rng = np.random.default_rng(0)
  s = cfg.img_size
  x = rng.normal(size=(1, 3, s, s)).astype(np.float32)
  out = {"env": environment(), "variant": args.variant, "weights": "random (all params)",
         "metric": "max|jax - torch| / max|torch|"}
  with torch.no_grad():
    t_emb = tsam.image_encoder(torch.from_numpy(x).to(dev)).cpu().numpy().transpose(0, 2, 3, 1)
  model = Sam(cfg)
  with jax.default_matmul_precision("highest"):
    emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Sam.encode))(
        params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  out["image_embeddings"] = ref.rel_err(emb, t_emb)
  coords = rng.uniform(0, s, (1, 3, 2)).astype(np.float32)
  labels = np.array([[1, 0, 1]], np.int32)
  boxes = np.array([[100.0, 200.0, 700.0, 900.0]], np.float32) * (s / 1024)  # vit_h's at 1024
  m = 4 * (s // cfg.patch_size)  # the mask prompt's side: 4 x the embedding's (256 for vit_h)
  masks = rng.normal(0, 5, (1, 1, m, m)).astype(np.float32)
  cases = {"points": dict(p=True), "box": dict(b=True), "mask": dict(m=True),
           "points+box+mask": dict(p=True, b=True, m=True)}
  T = lambda a: torch.from_numpy(a).to(dev)
  for name, c in cases.items():
    for multi in (True, False):
      with torch.no_grad():
        sp, de = tsam.prompt_encoder((T(coords), T(labels)) if c.get("p") else None,
                                     T(boxes) if c.get("b") else None,
                                     T(masks) if c.get("m") else None)
        tl, ti = tsam.mask_decoder(torch.from_numpy(t_emb.transpose(0, 3, 1, 2)).to(dev),
                                   tsam.prompt_encoder.get_dense_pe(), sp, de, multi)
      with jax.default_matmul_precision("highest"):
        l, i = model.apply({"params": params}, jnp.asarray(t_emb),
                           jnp.asarray(coords) if c.get("p") else None,
                           jnp.asarray(labels) if c.get("p") else None,
                           jnp.asarray(boxes) if c.get("b") else None,
                           jnp.asarray(masks.transpose(0, 2, 3, 1)) if c.get("m") else None,
                           multi, method=Sam.decode)
      key = f"{name}/multimask={multi}"
      out[key] = {"low_res_logits": ref.rel_err(l, tl.cpu().numpy()),
                  "iou_predictions": ref.rel_err(i, ti.cpu().numpy())}
  worst = max([out["image_embeddings"]] + [v for k, d in out.items() if "/" in k
                                           for v in d.values()])
  out["worst"] = worst
  write_json(args.out, out)
  for k, v in out.items():
    if k != "env":
      print(k, v)
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/sam_parity.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
