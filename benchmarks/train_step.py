"""Training-step speed of the three FusionSAM stages (GPU benchmark).

  python benchmarks/train_step.py --out benchmarks/results/train_step_h100.json
  # CPU smoke test:
  python benchmarks/train_step.py --sam-variant tiny --height 96 --width 128 --steps 2 \
      --out /tmp/train_step_cpu.json

Cases (each in its own subprocess, so that peak GPU memory is per case):

* ``tokenizer``: the VQGAN step (generator + discriminator updates, both modalities);
* ``fusion``: the fusion-stage step (FMP + fused-image decoder);
* ``segmentation``: the segmentation step computing the SAM embedding in the step (the
  frozen encoder runs forward only), i.e. without the embedding cache;
* ``segmentation_cached``: the same step fed what the embedding cache stores
  (``image_embeddings`` and the fusion latents ``fusion`` in the batch), i.e. with the cache;
* ``embed``: the cache builder's cost, `stages.embed_fn` (tokenizers + FMP + fused decoder +
  SAM encoder, forward) per image;
* ``encoder``: the SAM image encoder's forward alone on the batch (SAM-normalised 1024 x 1024
  input): the reference for the "segmentation step <= 1.3 x encoder forward" target;
* ``fuse``: the frozen fusion path's forward alone (`stages.frozen_fusion`: tokenizers + FMP +
  fused decoder in ``--fusion-dtype``), the part of the uncached segmentation step that is
  neither encoder nor decoder.

Params are random (`fusionsam.init_params`: the encoder is drawn leaf by leaf, so no
1024 x 1024 forward is compiled just to initialise).

Timing: ``ms_per_step`` is the median over 3 runs of ``--steps`` steps dispatched back to
back (one wait at the end, as the training loop, which fetches metrics only at log steps);
``latency_ms`` the median of single steps each waited for (adds the host's dispatch time
to the device's).

Defaults: MFNet size 480 x 640, batch 4, SAM vit_h with random weights, bf16 encoder with cuDNN
attention (XLA attention off-GPU), the mfnet config's model otherwise. Reports ms/step
(median), pairs/s, compile time (first call) and peak device memory
(``jax.local_devices()[0].memory_stats()["peak_bytes_in_use"]``, null where the backend has
no memory stats). Budget: the defaults finish in well under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402

CASES = ("tokenizer", "fusion", "segmentation", "segmentation_cached", "embed", "encoder",
         "fuse")


def make_config(args):
  import importlib.util
  spec = importlib.util.spec_from_file_location("mfnet_cfg", os.path.join(ROOT, "configs",
                                                                           "mfnet.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  import jax
  on_gpu = jax.devices()[0].platform == "gpu"
  m = c.model
  m.sam_variant = args.sam_variant
  m.sam_checkpoint = None
  m.allow_random_sam = True
  m.encoder_dtype = args.encoder_dtype
  m.fusion_dtype = args.fusion_dtype
  m.attn_impl = args.attn_impl if on_gpu else "xla"
  c.train.batch_size = args.batch
  c.train.crop_size = (args.height, args.width)
  return c


def random_batch(c, b, h, w, seed=0):
  r = np.random.default_rng(seed)
  batch = {}
  for mname in c.model.modalities:
    ch = 3 if mname == "rgb" else 1
    batch[mname] = r.integers(0, 256, (b, h, w, ch), dtype=np.uint8)
  batch["label"] = r.integers(0, c.model.num_classes, (b, h, w)).astype(np.int32)
  return batch


def peak_bytes():
  import jax
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def run_case(case: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  from fusionsam_jax import experiment, stages
  from fusionsam_jax import training as T
  from fusionsam_jax.models import fusionsam

  c = make_config(args)
  mesh = T.make_mesh()
  b, h, w = args.batch, args.height, args.width
  t0 = time.perf_counter()
  model = experiment.build_model(c)
  params = fusionsam.init_params(model, jax.random.PRNGKey(0), (h, w))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  batch = random_batch(c, b, h, w)
  rng = jax.random.PRNGKey(1)

  if case in ("embed", "encoder", "fuse"):
    if case == "embed":
      fn = jax.jit(stages.embed_fn(model))
      gb = T.shard_batch({k: batch[k] for k in c.model.modalities}, mesh)
    elif case == "fuse":
      def fuse(p, x):
        return stages.frozen_fusion(model, p, stages.inputs_from_batch(x, c.model.modalities))
      fn = jax.jit(fuse)
      gb = T.shard_batch({k: batch[k] for k in c.model.modalities}, mesh)
    else:
      s = model.sam.img_size
      enc = fusionsam.image_encoder_of(model)
      fn = jax.jit(lambda p, x: enc.apply({"params": p["image_encoder"]},
                                          x.astype(jnp.dtype(c.model.encoder_dtype))))
      x = np.random.default_rng(0).standard_normal((b, s, s, 3)).astype(np.float32)
      gb = T.shard_batch({"x": x}, mesh)["x"]

    def step(state):
      return state, fn(state, gb)
    state = params
  else:
    sc = c.train.stages["segmentation" if case.startswith("segmentation") else case]
    mask, tx = experiment.stage_optimizer(c, "segmentation" if case.startswith(
        "segmentation") else case, params)
    if case == "tokenizer":
      disc = fusionsam.init_discriminators(c.model, rng, (h, w))
      d_tx = T.make_optimizer(float(sc.lr), float(sc.weight_decay))
      g_loss, d_loss = stages.tokenizer_losses(model, c.model, sc, perceptual=None)
      state = jax.device_put(T.init_gan_state({"generator": params, "discriminator": disc},
                                              tx, d_tx, rng), T.replicated(mesh))
      fn = T.make_gan_train_step(g_loss, d_loss, tx, d_tx, mesh)
    else:
      loss = (stages.fusion_loss_fn(model, c.model, sc) if case == "fusion"
              else stages.segmentation_loss_fn(model, c.model, sc))
      if case == "segmentation_cached":
        cached = jax.jit(stages.cache_fn(model))(params, {k: batch[k][:1] for k in
                                                          c.model.modalities})
        for k, v in cached.items():  # image_embeddings, fusion
          batch[k] = np.repeat(np.asarray(v, np.float32), b, 0)
      state = jax.device_put(T.TrainState.create(params, tx, rng), T.replicated(mesh))
      fn = T.make_train_step(loss, tx, mesh, trainable=mask, pass_step=True)
    gb = T.shard_batch(batch, mesh)

    def step(state):
      return fn(state, gb)

  t0 = time.perf_counter()
  state, out = step(state)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, out = step(state)
  jax.block_until_ready(out)
  times = []  # latency: each step waited for on its own
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, out = step(state)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  runs = []  # throughput: steps dispatched back to back, as the training loop runs them
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, out = step(state)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t0) / args.steps)
  ms = float(np.median(runs) * 1e3)
  if args.profile_dir:  # a few more steps under the profiler (perfetto trace, for summaries)
    with jax.profiler.trace(os.path.join(args.profile_dir, case), create_perfetto_trace=True):
      for _ in range(3):
        state, out = step(state)
      jax.block_until_ready(out)
  res = {"case": case, "batch": b, "height": h, "width": w, "ms_per_step": ms,
         "latency_ms": float(np.median(times) * 1e3),
         "min_latency_ms": float(np.min(times) * 1e3), "pairs_per_s": b / (ms / 1e3),
         "first_call_s": compile_s, "init_s": init_s, "steps_timed": args.steps,
         "peak_bytes_in_use": peak_bytes(),
         "params_m": T.count_params(params) / 1e6}
  if res["peak_bytes_in_use"]:
    res["peak_gib"] = res["peak_bytes_in_use"] / 2 ** 30
  if case not in ("embed", "encoder", "fuse"):
    metrics = jax.device_get(out)
    res["loss"] = float(np.asarray(metrics["loss"]))
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sam-variant", default="vit_h", choices=("tiny", "vit_b", "vit_l", "vit_h"))
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=10, help="timed steps per case")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--encoder-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--fusion-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype of the frozen fusion path (model.fusion_dtype)")
  p.add_argument("--attn-impl", default="cudnn", choices=("cudnn", "xla"))
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--case-timeout", type=int, default=240, help="seconds per case")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                               "train_step.json"))
  p.add_argument("--profile-dir", default=None,
                 help="also trace 3 steps per case with jax.profiler (perfetto trace) into "
                      "DIR/<case>; summarise with benchmarks/trace_summary.py")
  p.add_argument("--in-process", action="store_true",
                 help="run the cases in this process (peak memory then accumulates)")
  p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args._case:  # child process
    res = run_case(args._case, args)
    with open(args._result, "w") as f:
      json.dump(res, f)
    return 0

  cases = [x.strip() for x in args.cases.split(",") if x.strip()]
  bad = [x for x in cases if x not in CASES]
  if bad:
    p.error(f"unknown case(s) {bad}; choose from {CASES}")
  results = {"environment": environment(), "settings": {
      k: v for k, v in vars(args).items() if not k.startswith("_")}, "cases": {}}

  def save():
    write_json(args.out, results)

  for case in cases:
    print(f"--- {case}", flush=True)
    t0 = time.perf_counter()
    if args.in_process:
      try:
        res = run_case(case, args)
      except Exception as e:  # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    else:
      tmp = f"{args.out}.{case}.part.json"
      cmd = [sys.executable, os.path.abspath(__file__), "--_case", case, "--_result", tmp]
      for k in ("sam_variant", "height", "width", "batch", "steps", "warmup",
                "encoder_dtype", "fusion_dtype", "attn_impl", "profile_dir"):
        if getattr(args, k) is not None:
          cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
      try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
        if r.returncode == 0 and os.path.exists(tmp):
          with open(tmp) as f:
            res = json.load(f)
        else:
          res = {"error": f"exit {r.returncode}: {r.stderr[-1500:]}"}
      except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {args.case_timeout} s"}
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
    res["wall_s"] = time.perf_counter() - t0
    results["cases"][case] = res
    if "error" in res:
      print(f"    error: {res['error'][-400:]}", flush=True)
    else:
      mem = f"{res['peak_gib']:.1f} GiB" if res.get("peak_gib") else "n/a"
      print(f"    {res['ms_per_step']:8.1f} ms/step  {res['pairs_per_s']:7.2f} pairs/s  "
            f"latency {res['latency_ms']:.1f} ms  "
            f"compile {res['first_call_s']:.1f} s  peak {mem}", flush=True)
    save()
  seg, cached = results["cases"].get("segmentation", {}), results["cases"].get(
      "segmentation_cached", {})
  if "ms_per_step" in seg and "ms_per_step" in cached:
    results["cache_speedup"] = seg["ms_per_step"] / cached["ms_per_step"]
    print(f"embedding cache speed-up of the segmentation step: "
          f"{results['cache_speedup']:.2f}x")
  enc = results["cases"].get("encoder", {})
  if "ms_per_step" in seg and "ms_per_step" in enc:
    results["segmentation_over_encoder"] = seg["ms_per_step"] / enc["ms_per_step"]
    print(f"segmentation step / encoder forward of the batch: "
          f"{results['segmentation_over_encoder']:.2f}x (target <= 1.3x)")
  save()
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
