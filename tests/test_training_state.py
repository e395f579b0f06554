"""Optimizer masks, frozen params, NaN guard, GAN step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fusionsam_jax import training as T
import _toy
from fusionsam_jax.stages import common as C


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"sam_encoder": {"w": jax.random.normal(k[0], (4, 4))},
          "fmp": {"w": jax.random.normal(k[1], (4, 4)), "b": jnp.zeros((4,))},
          "decoder": {"w": jax.random.normal(k[2], (4, 2))}}


def _loss(params, batch, rng):
  h = jnp.tanh(batch["x"] @ params["sam_encoder"]["w"])
  h = jnp.tanh(h @ params["fmp"]["w"] + params["fmp"]["b"])
  out = h @ params["decoder"]["w"]
  mse = jnp.mean((out - batch["y"]) ** 2)
  return mse, {"mse": mse}


def test_select_drop_merge_partition_the_tree():
  p = _params()
  t = C.select(p, ["fmp", "decoder/w"])
  assert jax.tree.structure(t) == jax.tree.structure(
      {"fmp": {"w": 0, "b": 0}, "decoder": {"w": 0}})
  f = C.drop(p, ["fmp", "decoder/w"])
  assert set(f) == {"sam_encoder"}  # decoder had only w
  back = C.merge(f, t)
  assert jax.tree.structure(back) == jax.tree.structure(p)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
    assert a is b
  with pytest.raises(KeyError, match="'mask_decoder' not in the model's params"):
    C.select(p, ["mask_decoder"])


def test_state_holds_only_trained_params_and_matches_torch_adam():
  """A step updates the trained subtree exactly as torch.optim.Adam (L2 weight decay) does
  on the same loss, leaves the frozen params alone, and its state holds nothing else."""
  import torch
  params = _params()
  trained = ["fmp", "decoder"]
  lr, wd = 1e-2, 1e-3
  tx = C.make_optimizer(lr, wd)
  state = T.TrainState.create(C.select(params, trained), tx, rng=0)
  frozen = C.drop(params, trained)
  assert set(state.params) == {"fmp", "decoder"}
  n_train = T.count_params(state.params)
  assert n_train == 28
  assert sum(int(x.size) for x in jax.tree.leaves(state.opt_state)) == 2 * n_train + 1
  mesh = T.make_mesh(jax.devices()[:1])
  step = C.make_train_step(lambda p, b, r, s: _loss(p, b, r), tx, mesh)
  tp = {k: torch.tensor(np.asarray(v), requires_grad=True)
        for k, v in (("fw", params["fmp"]["w"]), ("fb", params["fmp"]["b"]),
                     ("dw", params["decoder"]["w"]))}
  enc = torch.tensor(np.asarray(params["sam_encoder"]["w"]))
  opt = torch.optim.Adam(tp.values(), lr=lr, weight_decay=wd)
  before = np.asarray(frozen["sam_encoder"]["w"]).copy()
  r = np.random.default_rng(0)
  with jax.default_matmul_precision("highest"):
    for _ in range(3):
      batch = {"x": r.normal(size=(8, 4)).astype(np.float32),
               "y": r.normal(size=(8, 2)).astype(np.float32)}
      state, metrics = step(state, frozen, T.shard_batch(batch, mesh))
      x, y = torch.tensor(batch["x"]), torch.tensor(batch["y"])
      h = torch.tanh(torch.tanh(x @ enc) @ tp["fw"] + tp["fb"])
      loss = torch.mean((h @ tp["dw"] - y) ** 2)
      opt.zero_grad()
      loss.backward()
      opt.step()
      np.testing.assert_allclose(metrics["loss"], loss.item(), rtol=1e-5)
  assert int(state.step) == 3 and set(metrics) == {"loss", "mse", "grad_norm"}
  np.testing.assert_allclose(state.params["fmp"]["w"], tp["fw"].detach().numpy(), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(state.params["decoder"]["w"], tp["dw"].detach().numpy(),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(frozen["sam_encoder"]["w"]), before)


def test_nan_guard_names_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path)
  with pytest.raises(T.NonFiniteLossError) as e:
    _toy.run(wd, steps_a=12, save_every=4, nan_at=7)
  err = e.value
  assert err.step == 7 and err.term == "mse" and err.last_good_checkpoint == 4
  assert "'mse'" in str(err) and "step 7" in str(err) and "step 4" in str(err)
  with T.StageCheckpointer(os.path.join(wd, "checkpoints", "a")) as ck:
    assert ck.all_steps() == [4] and not ck.is_stage_done()
    p = _toy.ToyModel().init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"]
    tx = C.make_optimizer(3e-3, 1e-3, clip=1.0)
    r = ck.restore(T.TrainState.create(dict(p), tx, rng=1))
    assert r.step == 4 and all(np.isfinite(np.asarray(x)).all()
                               for x in jax.tree.leaves(r.state))


def test_check_finite_direct():
  T.check_finite({"loss": np.float32(1.0), "count": np.int32(3)}, step=1)
  with pytest.raises(T.NonFiniteLossError, match=r"'perceptual' = inf at step 9"):
    T.check_finite({"loss": np.float32(np.inf), "perceptual": np.float32(np.inf),
                    "rec": np.float32(0.1)}, step=9)


def test_gan_step_updates_both_groups_with_own_optimizer_state():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  params = {"generator": {"w": jax.random.normal(k[0], (4, 4))},
            "discriminator": {"w": jax.random.normal(k[1], (4, 1))}}
  g_tx, d_tx = C.make_optimizer(1e-2, 0.0), C.make_optimizer(1e-2, 0.0)
  state = T.TrainState.create(params, optax.identity(), rng=0).replace(
      opt_state={"g": g_tx.init(params["generator"]), "d": d_tx.init(params["discriminator"])})
  assert set(state.opt_state) == {"g", "d"}

  def g_loss(g, d, batch, rng, step):
    fake = jnp.tanh(batch["x"] @ g["w"])
    rec = jnp.mean((fake - batch["x"]) ** 2)
    adv = -jnp.mean(fake @ d["w"])
    return rec + 0.1 * adv, ({"rec": rec, "adv": adv}, fake)

  def d_loss(d, fake, batch, rng, step):
    real, fake_s = batch["x"] @ d["w"], fake @ d["w"]
    loss = jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake_s))
    return loss, {"hinge": loss}

  mesh = T.make_mesh(jax.devices()[:1])
  step = C.make_gan_train_step(g_loss, d_loss, g_tx, d_tx, mesh)
  before = jax.tree.map(np.asarray, params)
  batch = T.shard_batch({"x": np.random.default_rng(0).normal(size=(8, 4)).astype(
      np.float32)}, mesh)
  state, m = step(state, {}, batch)
  assert {"loss", "rec", "adv", "d_loss", "d/hinge", "grad_norm", "d_grad_norm"} <= set(m)
  for g in ("generator", "discriminator"):
    assert not np.array_equal(np.asarray(state.params[g]["w"]), before[g]["w"])
  assert int(state.step) == 1


def test_stage_lr_schedules():
  """``lr_schedule``: "constant" is the stage's lr; "cosine" anneals it to 0 over the stage
  (lr / 2 x (1 + cos(pi t / T)), written out here); anything else is refused by name."""
  import math
  import ml_collections
  cfg = ml_collections.ConfigDict({"train": {"stages": {"fusion": {"lr": 2e-3}}}})
  assert C.stage_lr(cfg, "fusion", 100) == 2e-3
  cfg.train.stages.fusion.lr_schedule = "cosine"
  lr = C.stage_lr(cfg, "fusion", 100)
  for t in (0, 1, 37, 50, 99, 100):
    assert float(lr(t)) == pytest.approx(1e-3 * (1 + math.cos(math.pi * t / 100)), abs=1e-9)
  assert C.describe_lr(lr) == "0.002 -> 0 (cosine)" and C.describe_lr(2e-3) == "0.002"
  cfg.train.stages.fusion.lr_schedule = "linear"
  with pytest.raises(ValueError, match="train.stages.fusion.lr_schedule is 'linear'"):
    C.stage_lr(cfg, "fusion", 100)
