"""Paper-config tokenizer (GAN) step at 480 x 640, batch 4: the cost of the dead-code restarts
(stages.codebook_restart_fn) and of Eq. 7 with SAM ViT-H's first 2 blocks as Phi (random
ViT-H weights: timing only), against the step without them.

    python benchmarks/tokenizer_step.py --out results.json
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import mfnet
from fusionsam_jax import losses, stages
from fusionsam_jax import training as T
from fusionsam_jax.models.fusionsam import CHANNELS, FusionSAM, build_model, init_discriminators


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  c = mfnet.get_config()
  m, sc = c.model, c.train.stages.tokenizer
  sc.num_steps = 100
  sc.disc_start = 0                       # time the full GAN step
  model = build_model(m)
  hw, b = (480, 640), 4
  params = {}
  for i, k in enumerate(m.modalities):
    x = jnp.zeros((1,) + hw + (CHANNELS[k],))
    params.update(jax.jit(lambda r, x, k=k: model.init(r, x, k, method=FusionSAM.tokenizer))(
        jax.random.PRNGKey(i), x)["params"])
  disc = init_discriminators(m, jax.random.PRNGKey(9), hw)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (b,) + hw + (CHANNELS[k],), dtype=np.uint8)
           for k in m.modalities}
  perc = None
  res = {"device": jax.devices()[0].device_kind, "batch": b, "hw": hw, "cases": []}
  for case in ("plain", "restart", "restart+sam_perceptual"):
    if case == "restart+sam_perceptual":
      from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
      from fusionsam_jax.models.sam_perceptual import SamPerceptualLoss
      cfg = SAM_PRESETS["vit_h"]
      enc = jax.jit(lambda r: Sam(cfg).init_params(r)["image_encoder"])(jax.random.PRNGKey(3))
      perc = SamPerceptualLoss(cfg, enc, num_blocks=2, dtype=jnp.bfloat16, attn_impl="cudnn")
    g_loss, d_loss = stages.tokenizer_losses(model, m, sc, perceptual=perc)
    mask = T.trainable_mask(params, stages.trainable("tokenizer", m))
    tx = T.make_optimizer(1e-4, 1e-3, mask)
    d_tx = T.make_optimizer(losses.disc_lr_schedule(1e-4, 0), 1e-3)
    post = stages.codebook_restart_fn(model, m, sc) if case != "plain" else None
    state = T.init_gan_state({"generator": params, "discriminator": disc}, tx, d_tx, 0)
    step = T.make_gan_train_step(g_loss, d_loss, tx, d_tx, T.make_mesh(), donate=False,
                                 g_post_update=post)
    t0 = time.perf_counter()
    state, met = step(state, batch)
    jax.block_until_ready(met)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
      state, met = step(state, batch)
    jax.block_until_ready(met)
    ms = (time.perf_counter() - t0) / a.steps * 1e3
    met = jax.device_get(met)
    r = {"case": case, "ms_per_step": ms, "first_call_s": first,
         "d_loss": float(met["d_loss"]), "d_grad_norm": float(met["d_grad_norm"]),
         **{k: float(v) for k, v in met.items() if "perplexity" in k or "dead" in k
            or "restarted" in k}}
    print(json.dumps(r), flush=True)
    res["cases"].append(r)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
