r"""The part of a warm start the persistent compilation cache cannot save: tracing each
stage's jitted training step to a jaxpr and lowering it to StableHLO (the cache is keyed on
the lowered module, so both run on every start). Runs on abstract params (no weights are
allocated), so a CPU machine measures it for the full-size paper config.

    python benchmarks/trace_time.py --config configs/mfnet.py --data_dir D \
        --out benchmarks/results/trace_time_cpu.json

`D`: any prepared MFNet-layout set (only its split sizes and batch layout are read; the
batch shapes are the config's crop at its batch size). The tokenizer stage runs without
Eq. 7's perceptual loss here (it needs converted weights); with it, two more ViT blocks are
traced.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config, as for train")
_DATA = flags.DEFINE_string("data_dir", None, "a prepared dataset of the config's layout")
_STAGES = flags.DEFINE_list("stages", [], "stages (default: every stage of "
                            "fusionsam_jax.stages.registry, in order)")
_OUT = flags.DEFINE_string("out", None, "JSON output")


def batch_shapes(stage) -> dict:
  """The stage's batch as ShapeDtypeStructs: one batch of its iterator (at the stage's crop
  and batch size), numeric part only."""
  import jax
  from fusionsam_jax.data.spec import strip_batch
  el = strip_batch(next(iter(stage.iterator(None))))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in el.items()}


def main(argv):
  del argv
  from fusionsam_jax import experiment
  from fusionsam_jax.models import factory
  config = _CONFIG.value
  with config.unlocked():
    config.data_dir = _DATA.value
    config.model.sam_checkpoint = None
    config.model.allow_random_sam = True
  ctx = experiment.context(config, None, progress=False)
  params = factory.abstract_params(config, ctx.model)
  res = {}
  from fusionsam_jax.stages import registry
  for name in _STAGES.value or registry.NAMES:
    stage = experiment.build_stage(ctx, name, perceptual=False)
    if stage is None:
      continue
    state = stage.abstract_state(params)
    frozen = stage.frozen(params)
    batch = batch_shapes(stage)
    # Once, as a new process does: JAX caches a function's jaxpr and lowering in-process,
    # so a second call here would measure the cache.
    t0 = time.perf_counter()
    traced = stage.train_step.trace(state, frozen, batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    res[name] = {"trace_s": t1 - t0, "lower_s": t2 - t1,
                 "stablehlo_bytes": len(lowered.as_text()),
                 "batch": {k: list(v.shape) for k, v in batch.items()}}
    print(name, res[name], flush=True)
  out = {"environment": environment(), "stages": res,
         "trace_plus_lower_s": sum(v["trace_s"] + v["lower_s"] for v in res.values())}
  print(f"trace + lower, all stages: {out['trace_plus_lower_s']:.1f} s")
  if _OUT.value:
    write_json(_OUT.value, out)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "data_dir"])
  app.run(lambda argv: sys.exit(main(argv)))
