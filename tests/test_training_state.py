"""Optimizer masks, frozen params, NaN guard, GAN step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fusionsam_jax import training as T
from fusionsam_jax.training import _toy


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


def test_trainable_mask_forms():
  p = _params()
  m = T.trainable_mask(p, ["fmp", "decoder/w"])
  assert m == {"sam_encoder": {"w": False}, "fmp": {"w": True, "b": True},
               "decoder": {"w": True}}
  assert T.trainable_mask(p, lambda path, x: path[0] == "fmp")["fmp"]["b"] is True
  assert T.trainable_mask(p, {"sam_encoder": False, "fmp": True, "decoder": False}) == {
      "sam_encoder": {"w": False}, "fmp": {"w": True, "b": True}, "decoder": {"w": False}}
  assert all(jax.tree.leaves(T.trainable_mask(p, None)))
  with pytest.raises(ValueError, match=r"\['mask_decoder'\] not found.*top-level keys"):
    T.trainable_mask(p, "mask_decoder")


def test_frozen_params_unchanged_and_have_no_optimizer_state():
  params = _params()
  mask = T.trainable_mask(params, ["fmp", "decoder"])
  tx = T.make_optimizer(1e-2, 1e-3, mask, clip=1.0)
  state = T.TrainState.create(params, tx, rng=0)
  # Adam moments (mu, nu) exist only for the 4*4 + 4 + 4*2 trainable scalars
  n_train = T.count_params(params, mask)
  assert n_train == 28
  opt_leaves = jax.tree.leaves(state.opt_state)
  assert sum(int(x.size) for x in opt_leaves) == 2 * n_train + 1  # mu, nu and a count
  mesh = T.make_mesh(jax.devices()[:1])
  step = T.make_train_step(_loss, tx, mesh, trainable=mask)
  r = np.random.default_rng(0)
  before = jax.tree.map(np.asarray, params)
  for _ in range(3):
    batch = {"x": r.normal(size=(8, 4)).astype(np.float32),
             "y": r.normal(size=(8, 2)).astype(np.float32)}
    state, metrics = step(state, T.shard_batch(batch, mesh))
  assert int(state.step) == 3 and set(metrics) == {"loss", "mse", "grad_norm"}
  assert np.array_equal(np.asarray(state.params["sam_encoder"]["w"]),
                        before["sam_encoder"]["w"])
  assert not np.array_equal(np.asarray(state.params["fmp"]["w"]), before["fmp"]["w"])
  assert not np.array_equal(np.asarray(state.params["decoder"]["w"]), before["decoder"]["w"])


@pytest.mark.parametrize("ravel", [False, True])
def test_only_trainable_matches_optax_multi_transform(ravel):
  """The trainable-only optimizer state (a flat list, or one concatenated vector) gives the
  same updates as optax's own masking, with a state that holds no placeholder per frozen
  leaf; a prefix mask works too."""
  params = _params()
  mask = T.trainable_mask(params, ["fmp", "decoder"])
  inner = optax.chain(optax.clip_by_global_norm(0.5), optax.add_decayed_weights(1e-3),
                      optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
  ours = T.only_trainable(inner, mask, ravel=ravel)
  labels = jax.tree.map(lambda t: "t" if t else "f", mask)
  ref = optax.multi_transform({"t": inner, "f": optax.set_to_zero()}, labels)
  s_ours, s_ref = ours.init(params), ref.init(params)
  r = np.random.default_rng(0)
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), jnp.float32), params)
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_ref, s_ref = ref.update(g, s_ref, params)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not np.any(np.asarray(u_ours["sam_encoder"]["w"]))
  # mu and nu over the 28 trainable scalars only, plus the count; no per-leaf placeholders
  assert sum(int(x.size) for x in jax.tree.leaves(s_ours)) == 2 * 28 + 1
  assert jax.tree.structure(s_ours).num_nodes < jax.tree.structure(s_ref).num_nodes
  if ravel:  # mu and nu are one vector each
    assert len(jax.tree.leaves(s_ours)) < len(jax.tree.leaves(s_ref))
  prefix = {"sam_encoder": False, "fmp": True, "decoder": True}
  tx_pre, tx_full = (T.only_trainable(inner, m, ravel=ravel) for m in (prefix, mask))
  u_pre, _ = tx_pre.update(g, tx_pre.init(params), params)
  u_full, _ = tx_full.update(g, tx_full.init(params), params)
  for a, b in zip(jax.tree.leaves(u_pre), jax.tree.leaves(u_full)):
    np.testing.assert_array_equal(a, b)


def test_train_step_leaves_unread_frozen_params_out_of_the_jitted_call():
  """A frozen subtree the loss never reads is not passed to the compiled step (host time
  per argument), and the step's results equal the unsplit step's."""
  params = _params()
  params["unused"] = {"w": jnp.ones((64, 64))}
  mask = T.trainable_mask(params, ["fmp", "decoder"])
  tx = T.make_optimizer(1e-2, 1e-3, mask)
  mesh = T.make_mesh(jax.devices()[:1])
  step = T.make_train_step(_loss, tx, mesh, trainable=mask)
  plain = T.make_train_step(lambda p, b, r: _loss(jax.tree.map(
      lambda m, x: x if m else jax.lax.stop_gradient(x), mask, p), b, r), tx, mesh)
  r = np.random.default_rng(0)
  batch = T.shard_batch({"x": r.normal(size=(8, 4)).astype(np.float32),
                         "y": r.normal(size=(8, 2)).astype(np.float32)}, mesh)
  s1 = T.TrainState.create(params, tx, rng=0)
  s2 = T.TrainState.create(jax.tree.map(jnp.array, params), tx, rng=0)
  for _ in range(2):
    s1, m1 = step(s1, batch)
    s2, m2 = plain(s2, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert s1.params["unused"]["w"] is params["unused"]["w"]  # the very same array
  # What the step found the loss reads, and what it handed to the jitted part.
  (reads,) = step.reads_by_batch.values()
  _, fp = step.splitter.split(params, reads)
  assert fp["unused"]["w"] is None and fp["sam_encoder"]["w"] is not None
  assert fp["fmp"]["w"] is None  # trainable: in the other tree
  core = s1.replace(params=step.splitter.split(s1.params)[0])
  frozen_args = jax.tree.leaves(step.jitted.lower(core, fp, batch).args_info[0][1])
  assert [a.shape for a in frozen_args] == [(4, 4)]  # sam_encoder/w only


def test_l2_weight_decay_matches_torch_adam_form():
  p = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.25])}
  wd, lr = 0.1, 0.01
  tx = T.make_optimizer(lr, wd)
  upd, _ = tx.update(g, tx.init(p), p)
  ref_tx = optax.adam(lr)
  ref, _ = ref_tx.update({"w": g["w"] + wd * p["w"]}, ref_tx.init(p), p)
  np.testing.assert_allclose(upd["w"], ref["w"], rtol=1e-6)
  txw = T.make_optimizer(lr, wd, decoupled_weight_decay=True)
  refw_tx = optax.adamw(lr, weight_decay=wd)
  np.testing.assert_allclose(txw.update(g, txw.init(p), p)[0]["w"],
                             refw_tx.update(g, refw_tx.init(p), p)[0]["w"], rtol=1e-6)


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
    tx = T.make_optimizer(3e-3, 1e-3, T.trainable_mask(dict(p), None), clip=1.0)
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
  g_tx, d_tx = T.make_optimizer(1e-2, 0.0), T.make_optimizer(1e-2, 0.0)
  state = T.init_gan_state(params, g_tx, d_tx, rng=0)
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
  step = T.make_gan_train_step(g_loss, d_loss, g_tx, d_tx, mesh)
  before = jax.tree.map(np.asarray, params)
  batch = T.shard_batch({"x": np.random.default_rng(0).normal(size=(8, 4)).astype(
      np.float32)}, mesh)
  state, m = step(state, batch)
  assert {"loss", "rec", "adv", "d_loss", "d/hinge", "grad_norm", "d_grad_norm"} <= set(m)
  for g in ("generator", "discriminator"):
    assert not np.array_equal(np.asarray(state.params[g]["w"]), before[g]["w"])
  assert int(state.step) == 1
