r"""SAM ViT image encoder speed: the JAX port vs the official PyTorch encoder, same run.

  python benchmarks/sam_encoder.py --out benchmarks/results/sam_encoder_h100.json
  python benchmarks/sam_encoder.py --skip_torch --batches=1,8 --max_fp32_batch=1 \
      --jax_modes=fp32,bf16-cudnn --out benchmarks/results/sam_encoder_h100_jax.json
  # CPU smoke run (JAX only; the PyTorch encoder runs on CUDA):
  python benchmarks/sam_encoder.py --variant tiny --skip_torch --batches=1 --iters 1 \
      --jax_modes=fp32,bf16-xla --out /tmp/sam_encoder_cpu.json

Times the vit_h encoder at 1024x1024 (random weights), median ms/image over repeated
batches, for JAX fp32 (highest precision) and bf16 (fused attention), and PyTorch fp32,
bf16 autocast and bf16 autocast + torch.compile. TFLOP/s uses 5.96 TFLOP per image.
Also reports the JAX bf16 embedding's error against JAX fp32 on the same weights/input.
absl flags (``--help``); lists are comma-separated (``--jax_modes=fp32,bf16-cudnn``, an empty
value runs none: ``--torch_modes=``).
"""

import functools
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (define_number_list, define_profile_calls,  # noqa: E402
                               environment, flag_namespace, jax_mode, profile_calls,
                               write_json)
from fusionsam_jax.cli.driver import run_cli  # noqa: E402

TFLOP_PER_IMAGE = 5.96


def _median_ms(fn, sync, iters, warmup):
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e3), float(np.min(times) * 1e3)


def bench_jax(args, results, save):
  import jax
  import jax.numpy as jnp
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, make_image_encoder

  cfg = SAM_PRESETS[args.variant]
  s = cfg.img_size
  init_model = make_image_encoder(cfg)
  params = jax.jit(init_model.init)(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))["params"]
  # SAM inits rel-pos / pos_embed to zero: give them values so no path is trivially skipped.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(len(str(p))), a.shape)
      if ("rel_pos" in str(p) or "pos_embed" in str(p)) else a, params)
  x8 = jax.random.normal(jax.random.PRNGKey(1), (max(args.batches), s, s, 3), jnp.float32)
  ref_out = {}
  for mode in args.jax_modes:
    dtype = jnp.bfloat16 if mode.startswith("bf16") else jnp.float32
    _, impl, _ = jax_mode(mode)
    model = make_image_encoder(cfg, dtype=dtype, attn_impl=impl)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    prec = "highest" if dtype == jnp.float32 else "default"
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x.astype(dtype)).astype(jnp.float32))
    for b in args.batches:
      key = f"jax_{mode}_b{b}"
      if dtype == jnp.float32 and b > args.max_fp32_batch:
        continue
      x = x8[:b]
      try:
        with jax.default_matmul_precision(prec):
          t0 = time.perf_counter()
          out = fwd(p, x).block_until_ready()
          compile_s = time.perf_counter() - t0
          med, mn = _median_ms(lambda: fwd(p, x), lambda o: o.block_until_ready(),
                               args.iters, 2)
      except Exception as e:  # report and go on (e.g. an unsupported fused kernel)
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        save()
        continue
      if b == 1:
        ref_out[mode] = np.asarray(out, np.float32)
      results[key] = {"framework": "jax", "mode": mode, "batch": b,
                      "ms_per_image": med / b, "ms_per_batch": med, "min_ms_per_batch": mn,
                      "tflops": TFLOP_PER_IMAGE * b / (med / 1e3), "first_call_s": compile_s}
      print(f"{key:32s} {med / b:8.2f} ms/img  {TFLOP_PER_IMAGE * b / med * 1e3:6.1f} TFLOP/s",
            flush=True)
      if args.profile_calls and b == max(args.batches):
        with jax.default_matmul_precision(prec):
          results[key]["profile"] = profile_calls(lambda: fwd(p, x), args.profile_calls, key)
      save()
    del fwd, p
    gc.collect()
  if "fp32" in ref_out:
    want = ref_out["fp32"]
    for mode, got in ref_out.items():
      if mode != "fp32":
        results[f"error_{mode}_vs_fp32"] = {
            "rel_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
            "max_abs_over_max": float(np.abs(got - want).max() / np.abs(want).max())}
        print(f"error {mode} vs fp32: {results[f'error_{mode}_vs_fp32']}", flush=True)
    save()


def bench_torch(args, results, save):
  import torch
  from segment_anything.modeling import ImageEncoderViT

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  enc = ImageEncoderViT(depth=32, embed_dim=1280, img_size=1024, mlp_ratio=4,
                        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                        num_heads=16, patch_size=16, qkv_bias=True, use_rel_pos=True,
                        global_attn_indexes=(7, 15, 23, 31), window_size=14,
                        out_chans=256).cuda().eval()
  x8 = torch.randn(max(args.batches), 3, 1024, 1024, device="cuda")
  sync = lambda o: torch.cuda.synchronize()
  for mode in args.torch_modes:
    fn = enc
    if mode == "bf16_compile":
      fn = torch.compile(enc)
    for b in args.batches:
      if mode == "fp32" and b > args.max_fp32_batch:
        continue
      if mode == "bf16_compile" and b not in args.compile_batches:
        continue
      key = f"torch_{mode}_b{b}"
      x = x8[:b]

      def run():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=mode != "fp32"):
          return fn(x)
      try:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        med, mn = _median_ms(run, sync, args.iters, 2)
      except Exception as e:
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        save()
        continue
      results[key] = {"framework": "torch", "mode": mode, "batch": b,
                      "ms_per_image": med / b, "ms_per_batch": med, "min_ms_per_batch": mn,
                      "tflops": TFLOP_PER_IMAGE * b / (med / 1e3), "first_call_s": first}
      print(f"{key:32s} {med / b:8.2f} ms/img  {TFLOP_PER_IMAGE * b / med * 1e3:6.1f} TFLOP/s",
            flush=True)
      save()
    torch.cuda.empty_cache()


def _define(fv):
  from absl import flags
  return {
      "out": flags.DEFINE_string("out", "benchmarks/results/sam_encoder.json", "JSON path",
                                 flag_values=fv),
      "variant": flags.DEFINE_string("variant", "vit_h", "SAM preset of the JAX encoder "
                                     "(the PyTorch one is always vit_h)", flag_values=fv),
      "batches": define_number_list(fv, "batches", [1, 4, 8], "batch sizes", min_length=1),
      "iters": flags.DEFINE_integer("iters", 10, "timed calls per measurement", flag_values=fv),
      "max_fp32_batch": flags.DEFINE_integer("max_fp32_batch", 8, "fp32 runs only up to this "
                                             "batch", flag_values=fv),
      "jax_modes": flags.DEFINE_list("jax_modes", ["fp32", "bf16-cudnn", "bf16-cudnn_bias",
                                                   "bf16-xla"],
                                     "JAX modes: fp32 | bf16-<attn_impl>", flag_values=fv),
      "torch_modes": flags.DEFINE_list("torch_modes", ["fp32", "bf16", "bf16_compile"],
                                       "PyTorch modes: fp32 | bf16 | bf16_compile",
                                       flag_values=fv),
      "compile_batches": define_number_list(fv, "compile_batches", [8],
                                            "batch sizes timed with torch.compile"),
      "skip_torch": flags.DEFINE_bool("skip_torch", False, "JAX only", flag_values=fv),
      "profile_calls": define_profile_calls(fv),
  }


def _run(f, _):
  args = flag_namespace(f)
  results = {"env": environment(), "tflop_per_image": TFLOP_PER_IMAGE, "variant": args.variant,
             "resolution": 1024, "weights": "random"}
  save = lambda: write_json(args.out, results)
  # Torch first: JAX preallocates most GPU memory once it starts.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if not args.skip_torch and args.torch_modes:
    bench_torch(args, results, save)
    import torch
    torch.cuda.empty_cache()
  bench_jax(args, results, save)
  save()
  rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and "ms_per_image" in v]
  print("\n| run | batch | ms/image | TFLOP/s |\n|---|---|---|---|")
  for k, v in rows:
    print(f"| {v['framework']} {v['mode']} | {v['batch']} | {v['ms_per_image']:.2f} | "
          f"{v['tflops']:.0f} |")
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/sam_encoder.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
