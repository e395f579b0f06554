"""Where does the vit_h encoder's time go? Times its parts at batch 8, bf16.

  python benchmarks/encoder_profile.py --out benchmarks/results/encoder_profile.json
  python benchmarks/encoder_profile.py --what=blocks,encoder --impls=cudnn --out PATH.json
  # CPU smoke run (the matmul part only, batch 1):
  python benchmarks/encoder_profile.py --what=matmul --batch 1 --out /tmp/encoder_profile.json

``--what``: any of matmul (one MLP-sized bf16 matmul), blocks (a windowed and a global block
per attention implementation, the MLP and a LayerNorm), encoder (the whole vit_h encoder per
implementation). absl flags (``--help``); lists are comma-separated.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, flag_namespace, write_json  # noqa: E402
from fusionsam_jax.cli.driver import run_cli  # noqa: E402


def timeit(fn, *args, iters=10):
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts) * 1e3)


def _define(fv):
  from absl import flags
  return {
      "out": flags.DEFINE_string("out", "benchmarks/results/encoder_profile.json", "JSON path",
                                 flag_values=fv),
      "batch": flags.DEFINE_integer("batch", 8, "batch size", flag_values=fv),
      "what": flags.DEFINE_list("what", ["matmul", "blocks", "encoder"],
                                "parts to time: matmul, blocks, encoder", flag_values=fv),
      "impls": flags.DEFINE_list("impls", ["cudnn", "cudnn_bias", "xla"],
                                 "attention implementations (blocks, encoder)",
                                 flag_values=fv),
  }


def _run(f, _):
  args = flag_namespace(f)
  import jax
  import jax.numpy as jnp
  from fusionsam_jax.models.sam.image_encoder import Block
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, make_image_encoder
  bf = jnp.bfloat16
  b = args.batch
  res = {"env": environment(), "batch": b, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  key = jax.random.PRNGKey(0)
  if "matmul" in args.what:
    a = jax.random.normal(key, (b * 4096, 1280), bf)
    w = jax.random.normal(key, (1280, 5120), bf)
    ms = timeit(jax.jit(lambda a, w: a @ w), a, w)
    res["matmul_ms"] = ms
    res["matmul_tflops"] = 2 * b * 4096 * 1280 * 5120 / ms / 1e9
    print("matmul", ms, res["matmul_tflops"], flush=True)
  if "blocks" in args.what:
    x = jax.random.normal(key, (b, 64, 64, 1280), bf)
    for impl in args.impls:
      for ws in (14, 0):
        blk = Block(1280, 16, use_rel_pos=True, window_size=ws, input_size=(64, 64), dtype=bf,
                    attn_impl=impl)
        p = jax.tree.map(lambda t: t.astype(bf), blk.init(key, x)["params"])
        ms = timeit(jax.jit(lambda p, x: blk.apply({"params": p}, x)), p, x)
        name = f"block_{'win' if ws else 'global'}_{impl}"
        res[name + "_ms"] = ms
        print(name, ms, flush=True)
    # MLP half alone, and attention half alone (windowed)
    from fusionsam_jax.models.sam.common import MLPBlock
    mlp = MLPBlock(1280, 5120, dtype=bf)
    p = jax.tree.map(lambda t: t.astype(bf), mlp.init(key, x)["params"])
    res["mlp_ms"] = timeit(jax.jit(lambda p, x: mlp.apply({"params": p}, x)), p, x)
    print("mlp", res["mlp_ms"], flush=True)
    import flax.linen as nn
    ln = nn.LayerNorm(epsilon=1e-6, dtype=bf)
    p = ln.init(key, x)["params"]
    res["layernorm_ms"] = timeit(jax.jit(lambda p, x: ln.apply({"params": p}, x)), p, x)
    print("layernorm", res["layernorm_ms"], flush=True)
  if "encoder" in args.what:
    cfg = SAM_PRESETS["vit_h"]
    x = jax.random.normal(key, (b, 1024, 1024, 3), jnp.float32)
    for impl in args.impls:
      enc = make_image_encoder(cfg, dtype=bf, attn_impl=impl)
      p = jax.tree.map(lambda t: t.astype(bf), jax.jit(enc.init)(key, x[:1])["params"])
      ms = timeit(jax.jit(lambda p, x: enc.apply({"params": p}, x.astype(bf))), p, x, iters=5)
      res[f"encoder_{impl}_ms_per_image"] = ms / b
      print("encoder", impl, ms / b, flush=True)
  write_json(args.out, res)
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/encoder_profile.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
