"""Parity on fully random weights along the user's path, on CPU: official model -> converter
CLI -> `SamPredictor` / `Sam2ImagePredictor`, against the official predictors.

  JAX_PLATFORMS=cpu python benchmarks/parity_random_cpu.py \
      --out benchmarks/results/sam_parity_random_cpu.json

SAM: `segment_anything`'s `vit_b` with every tensor redrawn (tests/sam_reference.py: rel-pos
tables, pos_embed, biases, LayerNorm scales included), saved as a .pth and converted by
tools/convert_sam_weights.py. SAM 2: `sam2`'s hiera_t likewise (tests/sam2_reference.py,
pos_embed and pos_embed_window included), converted by tools/convert_sam2_weights.py. Both
read a 480 x 640 uint8 image; compared: the image embedding and the low-res mask logits for
point, box and combined prompts (max |jax - torch| / max |torch|), float32, JAX at
`default_matmul_precision("highest")`. `--baseline` embeds an earlier run's JSON (e.g. the
same script on an older commit) for a before / after record. absl flags (``--help``).
"""

import json
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
      "out": flags.DEFINE_string("out", None, "JSON path", flag_values=fv),
      "sam_variant": flags.DEFINE_string("sam_variant", "vit_b", "SAM preset ('' skips)",
                                         flag_values=fv),
      "sam2_variant": flags.DEFINE_string("sam2_variant", "hiera_t", "SAM 2 preset ('' "
                                          "skips)", flag_values=fv),
      "seed": flags.DEFINE_integer("seed", 1, "weights seed", flag_values=fv),
      "workdir": flags.DEFINE_string("workdir", None, "where the checkpoints go (unset: a new "
                                     "temporary folder)", flag_values=fv),
      "baseline": flags.DEFINE_string("baseline", None, "an earlier run's JSON to embed",
                                      flag_values=fv),
  }


def _prompts(h, w):
  pts = np.array([[w * 0.3, h * 0.6], [w * 0.7, h * 0.2]])
  lab = np.array([1, 0])
  box = np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])
  return {"points": dict(point_coords=pts, point_labels=lab), "box": dict(box=box),
          "points+box": dict(point_coords=pts, point_labels=lab, box=box)}


def _sam(variant, seed, work, image):
  import jax
  import torch
  import sam_reference as ref
  from fusionsam_jax.models.sam.predictor import SamPredictor
  from fusionsam_jax.models.sam.sam import SAM_PRESETS

  tsam = ref.build_torch_sam(SAM_PRESETS[variant], seed=seed)
  ref.assert_every_tensor_random(tsam)
  pth = os.path.join(work, f"sam_{variant}.pth")
  ref.save_state_dict(tsam, pth)
  res = ref.run_converter(pth, os.path.join(work, f"sam_{variant}"))
  if res.returncode:
    raise SystemExit(res.stderr.strip())
  t_pred = ref.official()[1].SamPredictor(tsam)
  with torch.no_grad():
    t_pred.set_image(image)
  with jax.default_matmul_precision("highest"):
    pred = SamPredictor.from_checkpoint(os.path.join(work, f"sam_{variant}"))
    pred.set_image(image)
    r = {"image_embedding": ref.rel_err(pred.get_image_embedding(),
                                        t_pred.get_image_embedding().numpy())}
    for name, case in _prompts(*image.shape[:2]).items():
      with torch.no_grad():
        _, _, tl = t_pred.predict(**case, multimask_output=True)
      _, _, low = pred.predict(**case, multimask_output=True)
      r[f"{name}/low_res_logits"] = ref.rel_err(low, tl)
  return r


def _sam2(variant, seed, work, image):
  import jax
  import sam2_reference as ref
  from fusionsam_jax.models.sam2.predictor import Sam2ImagePredictor

  tm = ref.build_torch_sam2(variant, seed=seed)
  ref.assert_every_tensor_random(tm)
  pt = os.path.join(work, f"sam2_{variant}.pt")
  ref.save_checkpoint(tm, pt)
  res = ref.run_converter(pt, os.path.join(work, f"sam2_{variant}"))
  if res.returncode:
    raise SystemExit(res.stderr.strip())
  t_pred = ref.official()[1].SAM2ImagePredictor(tm)
  t_pred.set_image(image)
  with jax.default_matmul_precision("highest"):
    pred = Sam2ImagePredictor.from_checkpoint(os.path.join(work, f"sam2_{variant}"))
    pred.set_image(image)
    r = {"image_embedding": ref.rel_err(
        pred.get_image_embedding(),
        t_pred._features["image_embed"].numpy().transpose(0, 2, 3, 1))}
    for name, case in _prompts(*image.shape[:2]).items():
      _, _, tl = t_pred.predict(**case, multimask_output=True)
      _, _, low = pred.predict(**case, multimask_output=True)
      r[f"{name}/low_res_logits"] = ref.rel_err(low, tl)
  return r


def _run(f, _):
  args = flag_namespace(f)
  os.environ["JAX_PLATFORMS"] = "cpu"
  work = args.workdir or tempfile.mkdtemp()
  os.makedirs(work, exist_ok=True)
  import torch

  env = environment()
  for pkg in ("segment_anything", "sam2"):
    try:
      from importlib.metadata import version
      env[pkg] = version(pkg)
    except Exception:  # not installed as a distribution
      env[pkg] = None
  env["device"] = "CPU"
  env["torch_threads"] = torch.get_num_threads()
  out = {"env": env, "device": "CPU", "seed": args.seed,
         "weights": "every tensor of the official model random (rel-pos, pos_embed, "
                    "pos_embed_window, biases, LayerNorm scales included)",
         "path": "official model -> .pth/.pt -> converter CLI -> SamPredictor / "
                 "Sam2ImagePredictor vs the official predictor, 480 x 640 uint8 image",
         "precision": "float32; JAX default_matmul_precision('highest')",
         "metric": "max|jax - torch| / max|torch|", "results": {}}
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
  if args.sam_variant:
    out["results"][f"sam_{args.sam_variant}"] = _sam(args.sam_variant, args.seed, work, image)
    print(out["results"], flush=True)
  if args.sam2_variant:
    out["results"][f"sam2.1_{args.sam2_variant}"] = _sam2(args.sam2_variant, args.seed, work,
                                                          image)
  for name, r in out["results"].items():
    r["max_low_res_logits"] = max(v for k, v in r.items() if k.endswith("low_res_logits"))
  if args.baseline:
    with open(args.baseline) as fh:
      out["baseline"] = json.load(fh)
  write_json(args.out, out)
  print(json.dumps(out["results"], indent=1))
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/parity_random_cpu.py", doc=__doc__,
                 required=("out",))


if __name__ == "__main__":
  sys.exit(main())
