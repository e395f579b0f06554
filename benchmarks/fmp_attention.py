"""FMP at MFNet's full latent size (120 x 160, d_c 64, 4 heads, batch 4): forward + backward
time and peak memory with windowed vs global cross-domain / complementary attention.

    python benchmarks/fmp_attention.py [--batch 4] [--out results.json]
    python benchmarks/fmp_attention.py --cases=window:xla,global:cudnn --steps 20
    python benchmarks/fmp_attention.py --dtype bfloat16 --cases=global:cudnn,global:cudnn:1
    # CPU smoke run:
    python benchmarks/fmp_attention.py --cases=window:xla --batch 1 --steps 1

``--cases``: comma-separated ``<cross_attention>:<attn_impl>[:<cross_num_heads>]``
(cross_attention window or global, attn_impl xla or cudnn, cross_num_heads default 4, the
self-attention keeps 4). ``--dtype``: of the latents and the FMP compute (float32, or bfloat16
as in bf16 training). Prints one JSON line per case; ``--out`` also writes them
as a JSON list. absl flags (``--help``).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import flag_namespace  # noqa: E402
from fusionsam_jax.cli.driver import run_cli  # noqa: E402
from fusionsam_jax.models.fmp import FusionMaskPrompting  # noqa: E402
from fusionsam_jax.models.precision import cast_floating  # noqa: E402


def run(cross, impl, batch, steps, dtype, cross_heads=None):
  fmp = FusionMaskPrompting(num_heads=4, depth_self=2, window_size=8, cross_attention=cross,
                            cross_num_heads=cross_heads, attn_impl=impl, query_chunk=1024)
  zs = [jax.random.normal(jax.random.PRNGKey(i), (batch, 120, 160, 64), dtype)
        for i in range(2)]
  params = jax.jit(fmp.init)(jax.random.PRNGKey(0), zs)

  @jax.jit
  def step(p, z):  # float32 params cast to the compute dtype, as the training stages do
    return jax.value_and_grad(lambda p: jnp.mean(
        fmp.apply(cast_floating(p, dtype), z)["fusion"].astype(jnp.float32) ** 2))(p)

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
  return {"cross_attention": cross, "attn_impl": impl, "cross_num_heads": cross_heads or 4,
          "dtype": jnp.dtype(dtype).name, "batch": batch,
          "ms_fwd_bwd": float(np.median(times) * 1e3), "first_call_s": compile_s,
          "xla_flops": float(cost.get("flops", float("nan"))) if cost else None,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30}


def _define(fv):
  from absl import flags
  return {
      "batch": flags.DEFINE_integer("batch", 4, "batch size", flag_values=fv),
      "steps": flags.DEFINE_integer("steps", 10, "timed steps per case", flag_values=fv),
      "cases": flags.DEFINE_list("cases", ["window:xla", "global:cudnn", "global:xla"],
                                 "<cross_attention>:<attn_impl>[:<cross_num_heads>] cases",
                                 flag_values=fv),
      "dtype": flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                                 "latents / FMP compute dtype", flag_values=fv),
      "out": flags.DEFINE_string("out", "", "JSON path (empty: print only)", flag_values=fv),
  }


def _run(f, _):
  a = flag_namespace(f)
  res = []
  for case in a.cases:
    cross, impl, *heads = case.split(":")
    r = run(cross, impl, a.batch, a.steps, jnp.dtype(a.dtype), int(heads[0]) if heads else None)
    r["device"] = jax.devices()[0].device_kind
    print(json.dumps(r), flush=True)
    res.append(r)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/fmp_attention.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
