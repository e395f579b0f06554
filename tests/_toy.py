"""A tiny two-stage training run used by the tests (and as a wiring example).

    python -m fusionsam_jax.training._toy --workdir /tmp/toy --steps_a 12 --steps_b 12

Stage "a" trains the whole toy MLP; stage "b" trains only its head (encoder frozen).
Data: a deterministic grain pipeline over an in-memory list. Final params are written to
``<workdir>/final_params.npz``. Exit codes: 0 done, 3 non-finite loss, 4 config mismatch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax import training as T
from fusionsam_jax.stages import common as C

NUM_RECORDS = 64
FEATURES = 8


class ToyModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(16, name="encoder")(x))
    return nn.Dense(2, name="head")(h)


def make_records(n: int = NUM_RECORDS, seed: int = 0) -> list[dict]:
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, FEATURES)).astype(np.float32)
  w = r.normal(size=(FEATURES, 2)).astype(np.float32)
  y = np.sin(x @ w).astype(np.float32)
  return [{"x": x[i], "y": y[i]} for i in range(n)]


def make_loader(batch_size: int, seed: int, kind: str = "dataloader"):
  """A repeating, shuffled, batched grain iterator (get_state/set_state)."""
  records = make_records()
  if kind == "dataloader":
    loader = grain.DataLoader(
        data_source=records,
        sampler=grain.samplers.IndexSampler(len(records), shuffle=True, seed=seed,
                                            num_epochs=None),
        operations=[grain.transforms.Batch(batch_size, drop_remainder=True)],
        worker_count=0)
    return iter(loader)
  ds = grain.MapDataset.source(records).repeat().seed(seed).random_map(
      _jitter).batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset())


def _jitter(rec, rng: np.random.Generator):
  return {"x": rec["x"] + np.float32(0.01) * rng.standard_normal(FEATURES).astype(np.float32),
          "y": rec["y"]}


def make_loss_fn(model: ToyModel, nan_at: int | None = None):
  def loss_fn(params, batch, rng, step):
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    pred = model.apply({"params": params}, x)
    mse = jnp.mean((pred - batch["y"]) ** 2)
    if nan_at is not None:
      mse = jnp.where(step + 1 == nan_at, jnp.nan, mse)
    reg = 1e-4 * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
    return mse + reg, {"mse": mse, "reg": reg}
  return loss_fn


class _Slow:
  """Forwards an iterator (and its get_state/set_state), sleeping before each batch."""

  def __init__(self, it, delay: float):
    self._it, self._delay = it, delay

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(self._delay)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, s):
    self._it.set_state(s)


def run(workdir: str, *, steps_a: int = 12, steps_b: int = 0, save_every: int = 4,
        eval_every: int = 0, batch_size: int = 8, step_delay: float = 0.0,
        nan_at: int | None = None, loader: str = "dataloader",
        allow_config_change: bool = False, progress: bool = False) -> dict[str, Any]:
  mesh = T.make_mesh()
  config = {"lr": 3e-3, "wd": 1e-3, "batch_size": batch_size, "seed": 0, "loader": loader,
            "steps_a": steps_a, "steps_b": steps_b}
  fp = T.check_workdir_config(workdir, config, ignore=("steps_a", "steps_b"),
                              allow_change=allow_config_change)
  model = ToyModel()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))["params"]
  params = jax.tree.map(jnp.asarray, dict(params))
  loss_fn = make_loss_fn(model, nan_at)
  records = make_records(16, seed=1)
  xs = np.stack([r["x"] for r in records])
  ys = np.stack([r["y"] for r in records])

  def eval_fn(p):
    pred = model.apply({"params": p}, xs)
    mse = float(np.mean((np.asarray(pred) - ys) ** 2))
    return {"val_miou": 1.0 / (1.0 + mse), "val_mse": mse}

  results = {}
  for name, steps, trainable in (("a", steps_a, tuple(params)), ("b", steps_b, ("head",))):
    if steps <= 0:
      continue
    tx = C.make_optimizer(config["lr"], config["wd"], clip=1.0)
    state = T.TrainState.create(C.select(params, trainable), tx,
                                rng=jax.random.PRNGKey(1 if name == "a" else 2))
    frozen = C.drop(params, trainable)
    it = make_loader(batch_size, seed=0 if name == "a" else 1, kind=loader)
    if step_delay:
      it = _Slow(it, step_delay)
    ckpt = T.StageCheckpointer(os.path.join(workdir, "checkpoints", name),
                               save_interval_steps=save_every, keep_latest=2, best_k=2,
                               stage=name, config_fingerprint=fp)
    step_fn = C.make_train_step(loss_fn, tx, mesh)
    with ckpt:
      res = T.run_stage(name=name, state=state, train_step=step_fn, data_iter=it, frozen=frozen,
                        num_steps=steps, mesh=mesh, checkpointer=ckpt, workdir=workdir,
                        eval_fn=(lambda st, frozen=frozen: eval_fn(C.merge(frozen, st.params)))
                        if eval_every else None, eval_every=eval_every,
                        log_every=4, learning_rate=config["lr"], progress=progress)
    params = C.merge(frozen, res.state.params)
    results[name] = res
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(os.path.join(workdir, "final_params.npz"), **flat)
  return results


def equivalence_run(num_devices: int, steps: int = 3) -> dict[str, np.ndarray]:
  """Trains a few steps on a mesh of the first `num_devices` devices (global batch 16)."""
  with jax.default_matmul_precision("highest"):
    mesh = T.make_mesh(jax.devices()[:num_devices])
    model = ToyModel()
    params = dict(model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))["params"])
    tx = C.make_optimizer(1e-2, 1e-3, clip=1.0)
    state = T.TrainState.create(C.select(params, ["head"]), tx, rng=3)
    frozen = C.drop(params, ["head"])
    step_fn = C.make_train_step(make_loss_fn(model), tx, mesh)
    recs = make_records(16 * steps, seed=5)
    out = {}
    for s in range(steps):
      chunk = recs[16 * s:16 * (s + 1)]
      batch = {k: np.stack([r[k] for r in chunk]) for k in ("x", "y")}
      state, m = step_fn(state, frozen, T.shard_batch(batch, mesh))
      out[f"loss_{s}"] = np.asarray(m["loss"])
    for p, x in jax.tree_util.tree_flatten_with_path(C.merge(frozen, state.params))[0]:
      out["param" + jax.tree_util.keystr(p)] = np.asarray(x)
    out["n_devices"] = np.asarray(len(mesh.devices.flat))
    out["batch_shards"] = np.asarray(len(
        T.shard_batch({"x": np.zeros((16, 1))}, mesh)["x"].addressable_shards))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps_a", type=int, default=12)
  p.add_argument("--steps_b", type=int, default=0)
  p.add_argument("--save_every", type=int, default=4)
  p.add_argument("--eval_every", type=int, default=0)
  p.add_argument("--step_delay", type=float, default=0.0)
  p.add_argument("--nan_at", type=int, default=None)
  p.add_argument("--loader", default="dataloader", choices=("dataloader", "dataset"))
  p.add_argument("--allow_config_change", action="store_true")
  p.add_argument("--equivalence_out", default=None,
                 help="instead of training, write equivalence_run(all devices) here")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  if a.equivalence_out:
    np.savez(a.equivalence_out, **equivalence_run(jax.device_count()))
    return 0
  try:
    run(a.workdir, steps_a=a.steps_a, steps_b=a.steps_b, save_every=a.save_every,
        eval_every=a.eval_every, step_delay=a.step_delay, nan_at=a.nan_at, loader=a.loader,
        allow_config_change=a.allow_config_change)
  except T.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except T.ConfigMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 4
  return 0


if __name__ == "__main__":
  sys.exit(main())
