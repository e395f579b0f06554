"""Run with 8 forced CPU devices: a segmentation-stage step of the tiny demo model on a mesh
of 1 device vs all 8 (global batch 8). Writes losses / updated params to argv[1] (.npz)."""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cli_helpers import tiny_config  # noqa: E402


def main(out_path):
  from fusionsam_jax import data
  from fusionsam_jax.models import factory
  from fusionsam_jax.stages import common as C
  from fusionsam_jax.stages import segmentation as S
  from fusionsam_jax import training as T
  cfg = tiny_config("/nonexistent")
  model = factory.build_model(cfg)
  params = factory.init_params(cfg, model)
  names = S.trainable(cfg.model)
  frozen = C.drop(params, names)
  els = data.generate_elements("mfnet", 16, seed=1, height=96, width=128)
  mods = tuple(cfg.model.modalities)
  batches = [{k: np.stack([np.asarray(e[k]) if k != "label" else np.asarray(e[k]).astype(np.int32)
                           for e in els[i:i + 8]]) for k in mods + ("label",)}
             for i in (0,)]
  out = {"n_devices": np.asarray(jax.device_count())}
  with jax.default_matmul_precision("highest"):
    for n in (1, jax.device_count()):
      mesh = T.make_mesh(jax.devices()[:n])
      tx = C.stage_optimizer(cfg, "segmentation", float(cfg.train.stages.segmentation.lr))
      loss_fn = S.loss_fn(model, cfg.model, cfg.train.stages.segmentation,
                          cfg.train.stages.fusion)
      step = C.make_train_step(loss_fn, tx, mesh)
      state = T.TrainState.create(jax.tree.map(lambda x: x.copy(), C.select(params, names)),
                                  tx, 0)
      for s, b in enumerate(batches):
        state, m = step(state, frozen, T.shard_batch(b, mesh))
        out[f"loss_{s}_{n}"] = np.asarray(m["loss"])
      name = sorted(names)[-1]
      sub = state.params
      for part in name.split("/"):  # trainable names may be sub-paths ("a/b")
        sub = sub[part]
      leaves = jax.tree.leaves(sub)
      out[f"param_{n}"] = np.asarray(leaves[0])
      out[f"shards_{n}"] = np.asarray(len(T.shard_batch(batches[0], mesh)["label"]
                                          .addressable_shards))
  np.savez(out_path, **out)


if __name__ == "__main__":
  main(sys.argv[1])
