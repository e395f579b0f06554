"""Eq. 8 live on the paper config's settings: the tokenizer stage's discriminator trains from
disc_start on when num_steps is shortened on the command line (as in the H100 runs)."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import mfnet
from fusionsam_jax import losses
from fusionsam_jax.stages import common as C
from fusionsam_jax.stages import tokenizer as tok_stage
from fusionsam_jax import training as T
from fusionsam_jax.models.fusionsam import CHANNELS, FusionSAM, build_model, init_discriminators


def _l2(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def test_discriminator_trains_after_disc_start_on_paper_config():
  c = mfnet.get_config()
  sc = c.train.stages.tokenizer
  sc.num_steps = 4                      # --config.train.stages.tokenizer.num_steps=4
  assert sc.disc_weight > 0 and sc.rec_loss == "l2"
  start = losses.disc_start_step(sc.disc_start, sc.num_steps, sc.disc_start_fraction,
                                 sc.disc_weight)
  assert start == 2
  # The paper model at tiny widths (the discriminator's start does not depend on them).
  m = mfnet.get_config("tiny").model
  model = build_model(m)
  hw = (16, 24)
  params = {}  # the tokenizers' params (all the tokenizer stage reads)
  for i, k in enumerate(m.modalities):
    x = jnp.zeros((1,) + hw + (CHANNELS[k],))
    params.update(model.init(jax.random.PRNGKey(i), x, k, method=FusionSAM.tokenizer)["params"])
  disc = init_discriminators(m, jax.random.PRNGKey(1), hw)
  g_loss, d_loss = tok_stage.losses_fn(model, m, sc, start)
  assert set(params) == set(tok_stage.trainable(m))
  tx = C.make_optimizer(float(sc.lr), float(sc.weight_decay))
  d_tx = C.make_optimizer(losses.disc_lr_schedule(sc.lr, start), float(sc.weight_decay))
  state = T.TrainState(step=jnp.zeros((), jnp.int32),
                       params={"generator": params, "discriminator": disc},
                       opt_state={"g": tx.init(params), "d": d_tx.init(disc)},
                       rng=jax.random.key_data(jax.random.PRNGKey(0)))
  restart = tok_stage.codebook_restart_fn(model, m, sc)   # on in the paper configs
  assert restart is not None
  step = C.make_gan_train_step(g_loss, d_loss, tx, d_tx, T.make_mesh(), post_update=restart)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (2,) + hw + (CHANNELS[k],), dtype=np.uint8)
           for k in m.modalities}
  with jax.default_matmul_precision("highest"):
    for i in range(int(sc.num_steps)):
      before = jax.device_get(state.params["discriminator"])
      state, met = step(state, {}, batch)
      met = jax.device_get(met)
      moved = _l2(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                               jax.device_get(state.params["discriminator"]), before))
      hinge = sum(float(met[f"d/{k}/d_hinge"]) for k in m.modalities)
      if i == 0:
        # The usage averages start at 0, so after the first step a code survives only if the
        # batch used it >= need = threshold / (1 - decay) times (the threshold, when
        # relative, a share of the mean use N / K): at most N / max(1, need) of the
        # N = 2 x 4 x 6 = 48 latent vectors' codes; every other code restarts at a batch
        # encoding.
        big_n, kc = 48, m.tokenizer.num_codes
        thr = float(sc.restart_threshold) * (big_n / kc if sc.restart_threshold_relative else 1)
        need = thr / (1 - float(m.tokenizer.usage_decay))
        for k in m.modalities:
          n = float(met[f"{k}/restarted_codes"])
          assert kc - big_n / max(1.0, need) <= n <= kc, (n, need)
      if i < start:
        # Before disc_start: no discriminator loss, gradient or update (not even weight
        # decay's: disc_lr_schedule).
        assert float(met["d_loss"]) == 0.0 and float(met["d_grad_norm"]) == 0.0 and moved == 0.0
      else:
        # From disc_start: the loss is the hinge loss summed over modalities, with non-zero
        # gradients, and Adam moves the discriminator's params (~lr per element).
        assert float(met["d_loss"]) > 0.5 and abs(float(met["d_loss"]) - hinge) < 1e-5
        assert float(met["d_grad_norm"]) > 0 and moved > 1e-5, (i, met["d_grad_norm"], moved)
        for k in m.modalities:
          assert float(met[f"{k}/adaptive_weight"]) > 0


def test_disc_weight_zero_runs_no_discriminator():
  """disc_weight 0 (the CPU demo): the step never runs the discriminator. With NaN
  discriminator params the generator update is still finite and equals the one with
  ordinary discriminator params (a discriminator that ran would put NaN into the losses)."""
  m = mfnet.get_config("tiny").model
  sc = mfnet.get_config("tiny").train.stages.tokenizer
  sc.disc_weight = 0.0
  sc.restart_dead_codes = False
  model = build_model(m)
  hw = (16, 24)
  params = {}
  for i, k in enumerate(m.modalities):
    x = jnp.zeros((1,) + hw + (CHANNELS[k],))
    params.update(model.init(jax.random.PRNGKey(i), x, k, method=FusionSAM.tokenizer)["params"])
  disc = init_discriminators(m, jax.random.PRNGKey(1), hw)
  nan_disc = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), disc)
  g_loss, d_loss = tok_stage.losses_fn(model, m, sc, 0)
  tx = C.make_optimizer(1e-3, 0.0)
  step = C.make_gan_train_step(g_loss, d_loss, tx, tx, T.make_mesh())
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (2,) + hw + (CHANNELS[k],), dtype=np.uint8)
           for k in m.modalities}
  out = []
  params = jax.device_get(params)   # host copies: the step donates its state's buffers
  for d in jax.device_get((disc, nan_disc)):
    state = T.TrainState(step=jnp.zeros((), jnp.int32),
                         params=jax.tree.map(jnp.array, {"generator": params,
                                                         "discriminator": d}),
                         opt_state={"g": tx.init(params), "d": tx.init(d)},
                         rng=jax.random.key_data(jax.random.PRNGKey(0)))
    state, met = step(state, {}, batch)
    out.append((jax.device_get(state.params["generator"]), jax.device_get(met)))
  (g_ok, met_ok), (g_nan, met_nan) = out
  assert np.isfinite(float(met_nan["loss"])) and float(met_nan["d_loss"]) == 0.0
  assert float(met_ok["loss"]) == float(met_nan["loss"])
  for a, b in zip(jax.tree.leaves(g_ok), jax.tree.leaves(g_nan)):
    np.testing.assert_array_equal(a, b)
