"""FMP at MFNet's full latent size (120 x 160, d_c 64, 4 heads, batch 4): forward + backward
time and peak memory with windowed vs global cross-domain / complementary attention.

    python benchmarks/fmp_attention.py [--batch 4] [--out results.json]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax.models.fmp import FusionMaskPrompting


def run(cross, impl, batch, steps, dtype):
  fmp = FusionMaskPrompting(num_heads=4, depth_self=2, window_size=8, cross_attention=cross,
                            attn_impl=impl, query_chunk=1024)
  zs = [jax.random.normal(jax.random.PRNGKey(i), (batch, 120, 160, 64), dtype)
        for i in range(2)]
  params = jax.jit(fmp.init)(jax.random.PRNGKey(0), zs)

  @jax.jit
  def step(p, z):
    return jax.value_and_grad(lambda p: jnp.mean(fmp.apply(p, z)["fusion"] ** 2))(p)

  t0 = time.perf_counter()
  jax.block_until_ready(step(params, zs))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, zs))
    times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  cost = step.lower(params, zs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"cross_attention": cross, "attn_impl": impl, "batch": batch,
          "ms_fwd_bwd": float(np.median(times) * 1e3), "first_call_s": compile_s,
          "xla_flops": float(cost.get("flops", float("nan"))) if cost else None,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--cases", default="window:xla,global:cudnn,global:xla")
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  res = []
  for case in a.cases.split(","):
    cross, impl = case.split(":")
    r = run(cross, impl, a.batch, a.steps, jnp.float32)
    r["device"] = jax.devices()[0].device_kind
    print(json.dumps(r), flush=True)
    res.append(r)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
