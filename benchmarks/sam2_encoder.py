r"""SAM 2 image encoder speed: the Flax Hiera + FPN vs Meta's `sam2` in PyTorch, same run.

  python benchmarks/sam2_encoder.py --out benchmarks/results/sam2_encoder_h100.json
  # CPU smoke run:
  python benchmarks/sam2_encoder.py --variant tiny --cpu --batches=1 --iters 1 \
      --torch_modes=bf16 --jax_modes=fp32,bf16-xla --out /tmp/sam2_encoder_cpu.json

Times `image_encoder` (Hiera trunk + FPN neck, what `set_image` runs) of SAM 2.1 hiera_l at
1024 x 1024 with random weights, median ms per image over repeated batches (batch 1 and 8):
JAX bf16 (cuDNN fused attention, and XLA attention) and fp32, PyTorch bf16 autocast, and
bf16 autocast + torch.compile (dynamic=False), all in one process (JAX preallocation off).
Also reports the JAX bf16 features' error against JAX fp32 on the same weights and input.
Needs `sam2` (install: SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation
sam2==1.1.0, plus hydra-core, iopath) unless --skip_torch. `--variant tiny --cpu` is a smoke
test on CPU. absl flags (``--help``); lists are comma-separated (``--jax_modes=fp32,bf16-cudnn``,
an empty value runs none: ``--torch_modes=``).
"""

import gc
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from benchmarks.common import (define_number_list, define_profile_calls,  # noqa: E402
                               environment, flag_namespace, jax_mode, profile_calls,
                               write_json)
from fusionsam_jax.cli.driver import run_cli  # noqa: E402


def _median_ms(fn, sync, iters, warmup):
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e3), float(np.min(times) * 1e3)


def _record(results, key, framework, mode, b, med, mn, first):
  results[key] = {"framework": framework, "mode": mode, "batch": b, "ms_per_image": med / b,
                  "ms_per_batch": med, "min_ms_per_batch": mn, "first_call_s": first}
  print(f"{key:36s} {med / b:9.2f} ms/img  (first call {first:.1f} s)", flush=True)


_TORCH = {}


def bench_torch(args, results, save, size, modes):
  import torch
  import sam2_reference as ref

  dev = "cpu" if args.cpu else "cuda"
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  if "enc" not in _TORCH:
    model = ref.build_torch_sam2(args.variant, seed=0, device=dev, prefer_real_torchvision=True)
    _TORCH["enc"] = model.image_encoder.eval()
    del model
    _TORCH["x"] = torch.randn(max(args.batches), 3, size, size, device=dev)
  enc, x_all = _TORCH["enc"], _TORCH["x"]
  results["torch_params_image_encoder"] = sum(p.numel() for p in enc.parameters())
  sync = (lambda o: torch.cuda.synchronize()) if dev == "cuda" else (lambda o: None)
  for mode in modes:
    fn = (torch.compile(enc, mode=args.compile_mode, dynamic=False) if mode == "bf16_compile"
          else enc)
    for b in args.batches:
      key = f"torch_{mode}_b{b}"
      x = x_all[:b]

      def run():
        with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=mode != "fp32"):
          return fn(x)["backbone_fpn"]
      try:
        t0 = time.perf_counter()
        sync(run())
        first = time.perf_counter() - t0
        med, mn = _median_ms(run, sync, args.iters, 2)
      except Exception as e:  # report and go on
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(key, results[key], flush=True)
        save()
        continue
      _record(results, key, "torch", mode, b, med, mn, first)
      save()
    del fn
    gc.collect()
    if dev == "cuda":
      torch.cuda.empty_cache()


_JAX = {"first_out": {}}


def bench_jax(args, results, save, size, modes):
  import jax
  import jax.numpy as jnp
  from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS, Sam2

  cfg = SAM2_PRESETS[args.variant]
  if "params" not in _JAX:
    params = jax.jit(Sam2(cfg).init_params)(jax.random.PRNGKey(0))
    # Zero-initialised position embeddings: give them values so no term is trivially zero.
    _JAX["params"] = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), a.shape)
        if "pos_embed" in str(p) else a, params)
    _JAX["x"] = jax.random.normal(jax.random.PRNGKey(1), (max(args.batches), size, size, 3))
  params, x_all, first_out = _JAX["params"], _JAX["x"], _JAX["first_out"]
  results["jax_params_image_encoder"] = int(sum(
      a.size for a in jax.tree_util.tree_leaves(params["image_encoder"])))
  for mode in modes:
    dtype = jnp.bfloat16 if mode.startswith("bf16") else jnp.float32
    _, impl, _ = jax_mode(mode)
    model = Sam2(cfg, dtype=dtype, attn_impl=impl)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    prec = "highest" if dtype == jnp.float32 else "default"
    fwd = jax.jit(lambda p, x: [f.astype(jnp.float32) for f in model.apply(
        {"params": p}, x.astype(dtype), method=Sam2.backbone)])
    for b in args.batches:
      key = f"jax_{mode}_b{b}"
      if dtype == jnp.float32 and b > args.max_fp32_batch:
        continue
      x = x_all[:b]
      try:
        with jax.default_matmul_precision(prec):
          t0 = time.perf_counter()
          out = jax.block_until_ready(fwd(p, x))
          first = time.perf_counter() - t0
          med, mn = _median_ms(lambda: fwd(p, x), jax.block_until_ready, args.iters, 2)
      except Exception as e:
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(key, results[key], flush=True)
        save()
        continue
      if b == min(args.batches):
        first_out[mode] = [np.asarray(o, np.float32) for o in out]
      _record(results, key, "jax", mode, b, med, mn, first)
      if args.profile_calls and b == max(args.batches):
        with jax.default_matmul_precision(prec):
          results[key]["profile"] = profile_calls(lambda: fwd(p, x), args.profile_calls, key)
      save()
    del fwd, p
    gc.collect()
  if "fp32" in first_out:
    for mode, got in list(first_out.items()):
      if mode != "fp32":
        results[f"error_{mode}_vs_fp32"] = [
            {"level": i, "rel_l2": float(np.linalg.norm(g - w) / np.linalg.norm(w)),
             "max_abs_over_max": float(np.abs(g - w).max() / np.abs(w).max())}
            for i, (g, w) in enumerate(zip(got, first_out["fp32"]))]
        print(f"error {mode} vs fp32: {results[f'error_{mode}_vs_fp32']}", flush=True)
    save()


def _define(fv):
  from absl import flags
  return {
      "out": flags.DEFINE_string("out", None, "JSON path", flag_values=fv),
      "variant": flags.DEFINE_string("variant", "hiera_l", "SAM 2 preset", flag_values=fv),
      "batches": define_number_list(fv, "batches", [1, 8], "batch sizes", min_length=1),
      "iters": flags.DEFINE_integer("iters", 10, "timed calls per measurement", flag_values=fv),
      "jax_modes": flags.DEFINE_list("jax_modes", ["fp32", "bf16-cudnn", "bf16-xla"],
                                     "JAX modes: fp32 | bf16-<attn_impl>", flag_values=fv),
      "torch_modes": flags.DEFINE_list("torch_modes", ["bf16", "bf16_compile"],
                                       "PyTorch modes: fp32 | bf16 | bf16_compile",
                                       flag_values=fv),
      "compile_mode": flags.DEFINE_string(
          "compile_mode", "default", "torch.compile mode (sam2's own compile_image_encoder "
          "uses max-autotune, which compiles for many minutes)", flag_values=fv),
      "max_fp32_batch": flags.DEFINE_integer(
          "max_fp32_batch", 1, "JAX fp32 (the bf16 error reference) only up to this batch",
          flag_values=fv),
      "skip_torch": flags.DEFINE_bool("skip_torch", False, "JAX only", flag_values=fv),
      "profile_calls": define_profile_calls(fv),
      "skip_jax": flags.DEFINE_bool("skip_jax", False, "PyTorch only", flag_values=fv),
      "cpu": flags.DEFINE_bool("cpu", False, "smoke test on CPU", flag_values=fv),
  }


def _run(f, _):
  args = flag_namespace(f)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
  from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS
  size = SAM2_PRESETS[args.variant].image_size
  results = {"env": environment(), "variant": f"sam2.1_{args.variant}", "resolution": size,
             "weights": "random", "what": "image_encoder (Hiera trunk + FPN neck)",
             "compile_mode": args.compile_mode}
  try:
    import sam2
    results["env"]["sam2"] = getattr(sam2, "__version__", "1.1.0 (no __version__)")
  except ImportError:
    pass
  save = lambda: write_json(args.out, results)
  # Most wanted first (the JSON is rewritten after every measurement): PyTorch eager bf16,
  # JAX bf16 cuDNN, PyTorch + torch.compile, then JAX fp32 (error reference) and the rest.
  torch_modes = [] if args.skip_torch else list(args.torch_modes)
  jax_modes = [] if args.skip_jax else list(args.jax_modes)
  first_jax = [m for m in jax_modes if m == "bf16-cudnn"] or jax_modes[:1]
  phases = [("torch", [m for m in torch_modes if m != "bf16_compile"]), ("jax", first_jax),
            ("torch", [m for m in torch_modes if m == "bf16_compile"]),
            ("jax", [m for m in jax_modes if m not in first_jax])]
  for framework, modes in phases:
    if modes:
      (bench_torch if framework == "torch" else bench_jax)(args, results, save, size, modes)
  save()
  rows = [v for v in results.values() if isinstance(v, dict) and "ms_per_image" in v]
  print("\n| run | batch | ms/image |\n|---|---|---|")
  for v in rows:
    print(f"| {v['framework']} {v['mode']} | {v['batch']} | {v['ms_per_image']:.2f} |")
  return 0


def main(argv=None) -> int:
  return run_cli(_define, _run, argv, prog="benchmarks/sam2_encoder.py", doc=__doc__,
                 required=("out",))


if __name__ == "__main__":
  sys.exit(main())
