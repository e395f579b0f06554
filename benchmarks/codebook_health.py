"""Codebook usage of the paper-size tokenizer (d_c 64, K 1024, ch 64, 2 res blocks) on
generated MFNet-layout scenes at 480 x 640, batch 4, the paper's Adam (lr 1e-4, L2 decay
1e-3), Eq. 5 (l2) + Eq. 6: VQGAN's codebook against the paper configs' remedies. Also
checks FMP's global cuDNN attention against the XLA path on the same params.

    python benchmarks/codebook_health.py --steps 30 --out results.json
    # restart threshold relative to the mean use per code (the paper configs' default):
    python benchmarks/codebook_health.py --steps 60 --every 10 --nocudnn_check \
        --variants 8:1:0.8,8:r0.25:0.8 --out codebook_relative_h100.json
    # CPU, small: 32 x 48 scenes, batch 32
    python benchmarks/codebook_health.py --size 32,48 --batch 32 --num_train 96 --steps 30
    # + MAGVIT-v2's entropy penalty (weight 0.1, temperature 0.01):
    python benchmarks/codebook_health.py --steps 1000 --every 100 --nocudnn_check \
        --variants 8:r0.25:0.8:0.9:e0.1 --out codebook_entropy_h200.json
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusionsam_jax import losses  # noqa: E402
from fusionsam_jax.data.generate import generate_scene
from fusionsam_jax.models.fmp import FusionMaskPrompting
from fusionsam_jax.models.lstg import LatentTokenizer, restart_dead_codes

K = 1024


def run(remedy, train, held, steps, batch, every, lookup_dim=8, threshold=1.0, decay=None,
        relative=False, code_ema=None, entropy=0.0, temperature=0.01):
  kw = dict(l2_normalize=True, lookup_dim=lookup_dim, usage_decay=decay) if remedy else {}
  if entropy:
    kw.update(entropy_weight=entropy, entropy_temperature=temperature)
  tok = LatentTokenizer(in_channels=3, latent_dim=64, num_codes=K, ch=64, num_res_blocks=2,
                        max_groups=32, **kw)
  params = tok.init(jax.random.PRNGKey(0), train[:1])["params"]
  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(1e-4))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, rng):
    def loss(p):
      out = tok.apply({"params": p}, x)
      return losses.reconstruction_loss(x, out["recon"], "l2") + out["vq_loss"]
    g = jax.grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    if remedy:
      params, _ = restart_dead_codes(tok, params, x, rng, threshold=threshold,
                                     relative=relative, code_ema=code_ema)
    return params, opt

  @jax.jit
  def enc(p, x):   # held-out codes and reconstruction error (Eq. 5's l2)
    out = tok.apply({"params": p}, x)
    return out["indices"], jnp.mean(jnp.square(out["recon"] - x))
  rows, rng, t0 = [], np.random.default_rng(0), time.perf_counter()
  for i in range(1, steps + 1):
    x = train[rng.choice(len(train), batch, replace=False)]
    params, opt = step(params, opt, x, jax.random.PRNGKey(i))
    if i % every == 0 or i == 1:
      got = [jax.device_get(enc(params, held[j:j + 4])) for j in range(0, len(held), 4)]
      idx = np.concatenate([g[0] for g in got])
      u = losses.codebook_usage(idx, K)
      rows.append({"step": i, "perplexity": float(u["perplexity"]),
                   "dead_fraction": float(u["dead_fraction"]),
                   "held_rec_l2": float(np.mean([g[1] for g in got]))})
      print(json.dumps({"remedy": remedy, "lookup_dim": lookup_dim, "threshold": threshold,
                        "relative": relative, "decay": decay, "code_ema": code_ema,
                        "entropy": entropy, "temperature": temperature,
                        **rows[-1]}), flush=True)
  thr = f"{threshold:g}x mean use" if relative else f"{threshold:g}"
  name = (f"cosine+lookup{lookup_dim}+restart<{thr},ema{decay}"
          + (f"+code_ema{code_ema:g}" if code_ema is not None else "") if remedy else "vqgan")
  if entropy:
    name += f"+entropy{entropy:g}@T{temperature:g}"
  return {"remedy": name, "rows": rows,
          "seconds": time.perf_counter() - t0}


def cudnn_check():
  fmp = FusionMaskPrompting(num_heads=4, depth_self=2, window_size=8, cross_attention="global")
  zs = [jax.random.normal(jax.random.PRNGKey(i), (2, 120, 160, 64)) for i in range(2)]
  p = jax.jit(fmp.init)(jax.random.PRNGKey(0), zs)
  with jax.default_matmul_precision("highest"):
    a = jax.jit(lambda p: fmp.apply(p, zs)["I_f"])(p)
    b = jax.jit(lambda p: fmp.clone(attn_impl="cudnn").apply(p, zs)["I_f"])(p)
  d = np.abs(np.asarray(a) - np.asarray(b))
  return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
          "ref_mean_abs": float(np.abs(np.asarray(a)).mean())}


def _define(fv):
  from absl import flags
  d = dict(flag_values=fv)
  return {
      "steps": flags.DEFINE_integer("steps", 30, "training steps per variant", **d),
      "batch": flags.DEFINE_integer("batch", 4, "batch size", **d),
      "every": flags.DEFINE_integer("every", 10, "measure usage every this many steps", **d),
      "out": flags.DEFINE_string("out", "", "JSON output (empty: print only)", **d),
      "variants": flags.DEFINE_string(
          "variants", "vqgan,8:1", "comma-separated: vqgan or LOOKUP_DIM:RESTART_THRESHOLD"
          "[:USAGE_DECAY[:CODE_EMA]][:eWEIGHT[:tTEMPERATURE]]; THRESHOLD rX: X times the "
          "mean use per code (relative); eW: MAGVIT-v2's entropy penalty with weight W "
          "(temperature tT, default 0.01)", **d),
      "cudnn_check": flags.DEFINE_bool("cudnn_check", True, "also check FMP's global cuDNN "
                                       "attention against XLA (--nocudnn_check: skip)", **d),
      "size": flags.DEFINE_string("size", "480,640", "H,W of the generated scenes (latents "
                                  "H/4 x W/4)", **d),
      "num_train": flags.DEFINE_integer("num_train", 32, "training scenes", **d),
      "num_held": flags.DEFINE_integer("num_held", 8, "held-out scenes", **d),
  }


def main(argv=None) -> int:
  from fusionsam_jax.cli.driver import run_cli
  return run_cli(_define, _run, argv, prog="benchmarks/codebook_health.py", doc=__doc__)


def _run(f, _) -> int:
  import types
  a = types.SimpleNamespace(**{k: h.value for k, h in f.items()})
  a.no_cudnn_check = not a.cudnn_check
  from benchmarks.common import environment, write_json
  res = {"device": jax.devices()[0].device_kind, "environment": environment()}
  if not a.no_cudnn_check:
    res["fmp_global_cudnn_vs_xla"] = cudnn_check()
  print(json.dumps(res), flush=True)
  hh, ww = (int(v) for v in a.size.split(","))
  res["size"] = [hh, ww]
  load = lambda lo, n: np.stack([generate_scene("mfnet", i, 0, hh, ww)["rgb"] for i in
                                 range(lo, lo + n)]).astype(np.float32) / 255.0
  # held out: 8 images (at 480 x 640: 8 x 120 x 160 = 153 600 vectors)
  train, held = load(0, a.num_train), load(100, a.num_held)
  res["runs"] = []
  for v in a.variants.split(","):
    if v == "vqgan":
      res["runs"].append(run(False, train, held, a.steps, a.batch, a.every))
    else:
      parts = v.split(":")
      ent = [float(p[1:]) for p in parts if p.startswith("e")]
      temp = [float(p[1:]) for p in parts if p.startswith("t")]
      parts = [p for p in parts if p[0] not in "et"]
      ld, thr, *rest = parts
      rel = thr.startswith("r")   # r0.25: a fraction of the mean use per code (N / K)
      dec = float(rest[0]) if rest else None
      ema = float(rest[1]) if len(rest) > 1 else None   # EMA codebook update decay
      res["runs"].append(run(True, train, held, a.steps, a.batch, a.every, int(ld),
                             float(thr.lstrip("r")), dec, rel, ema,
                             ent[0] if ent else 0.0, temp[0] if temp else 0.01))
    if a.out:   # after each variant: a run cut short keeps what it measured
      write_json(a.out, res)
  if a.out:
    write_json(a.out, res)
  return 0


if __name__ == "__main__":
  sys.exit(main())
