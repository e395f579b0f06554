"""Codebook health at the paper's codebook size (K = 1024): after N tokenizer steps on
generated MFNet-layout scenes, perplexity >= 25 % of K and <= 25 % dead codes with the
paper configs' remedies (cosine + factorized 8-d codes, ViT-VQGAN; dead-code restart,
Jukebox / SoundStream), against VQGAN's plain codebook."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionsam_jax import losses
from fusionsam_jax.data.generate import generate_scene
from fusionsam_jax.models.lstg import LatentTokenizer, restart_dead_codes

K = 1024
HW = (32, 48)


def _scenes(first, num):
  return np.stack([generate_scene("mfnet", i, 0, *HW)["rgb"]
                   for i in range(first, first + num)]).astype(np.float32) / 255.0


def _train(remedy, train, steps, batch):
  kw = dict(l2_normalize=True, lookup_dim=8, usage_decay=0.8) if remedy else {}  # paper cfg
  tok = LatentTokenizer(in_channels=3, latent_dim=64, num_codes=K, ch=16, num_res_blocks=1,
                        max_groups=16, **kw)
  params = tok.init(jax.random.PRNGKey(0), train[:1])["params"]
  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(1e-4))  # the paper's Adam
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, rng):
    def loss(p):
      out = tok.apply({"params": p}, x)
      return losses.reconstruction_loss(x, out["recon"], "l2") + out["vq_loss"]
    g = jax.grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    if remedy:
      params, _ = restart_dead_codes(tok, params, x, rng)
    return params, opt

  rng = np.random.default_rng(0)
  for i in range(steps):
    x = train[rng.choice(len(train), batch, replace=False)]
    params, opt = step(params, opt, x, jax.random.PRNGKey(i))
  return tok, params


def _usage(tok, params, x):
  idx = jax.jit(lambda p, x: tok.apply({"params": p}, x, method=LatentTokenizer.encode)[
      "indices"])(params, x)
  u = losses.codebook_usage(idx, K)
  return float(u["perplexity"]), float(u["dead_fraction"])


def test_codebook_stays_healthy_at_paper_size():
  train, held = _scenes(0, 96), _scenes(200, 64)   # held out: 64 x 8 x 12 = 6144 vectors
  with jax.default_matmul_precision("highest"):
    tok, p = _train(True, train, steps=12, batch=32)
    perp, dead = _usage(tok, p, held)
    tok0, p0 = _train(False, train, steps=12, batch=32)
    perp0, dead0 = _usage(tok0, p0, held)
  print(f"remedy: perplexity {perp:.0f} / {K}, dead {dead:.0%}; "
        f"VQGAN codebook: perplexity {perp0:.0f}, dead {dead0:.0%}")
  assert perp >= 0.25 * K and dead <= 0.25, (perp, dead)
  assert perp > 4 * perp0 and dead < dead0


def test_ema_code_update_against_a_loop():
  from fusionsam_jax.models.lstg import ema_code_update
  rng = np.random.default_rng(0)
  k, d, n = 16, 3, 50
  cb = rng.normal(size=(k, d)).astype(np.float32)
  enc = rng.normal(size=(5, 10, d)).astype(np.float32)
  idx = rng.integers(0, k - 4, (5, 10))          # the last 4 codes unused
  got = np.asarray(ema_code_update(jnp.asarray(cb), jnp.asarray(enc), jnp.asarray(idx), 0.9))
  want = cb.copy()
  flat, fi = enc.reshape(n, d), idx.reshape(n)
  for c in range(k):
    members = [flat[i] for i in range(n) if fi[i] == c]
    if members:
      want[c] = 0.9 * cb[c] + 0.1 * np.mean(members, axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[-4:], cb[-4:])


def test_relative_restart_threshold_is_a_share_of_the_mean_use():
  """relative=True: codes used fewer than threshold x N / K times by the batch restart
  (counts recomputed here from the tokenizer's own indices)."""
  tok = LatentTokenizer(in_channels=3, latent_dim=8, num_codes=32, ch=8, num_res_blocks=1,
                        max_groups=1, l2_normalize=True, lookup_dim=4)
  x = jnp.asarray(_scenes(0, 4)[:, :16, :24])
  params = tok.init(jax.random.PRNGKey(0), x[:1])["params"]
  idx = np.asarray(tok.apply({"params": params}, x, method=LatentTokenizer.encode)["indices"])
  counts = np.bincount(idx.reshape(-1), minlength=32)
  for share in (0.25, 1.0):
    _, n = restart_dead_codes(tok, params, x, jax.random.PRNGKey(1), threshold=share,
                              relative=True)
    assert int(n) == int(np.sum(counts < share * idx.size / 32)), share
  _, n = restart_dead_codes(tok, params, x, jax.random.PRNGKey(1), threshold=1.0)
  assert int(n) == int(np.sum(counts < 1))


def test_entropy_penalty_against_numpy():
  """MAGVIT-v2's entropy penalty from distances, against a float64 numpy computation, and
  its two limits: -log K when every vector sits on its own code, ~0 when all share one."""
  from fusionsam_jax.models.lstg import entropy_penalty
  rng = np.random.default_rng(0)
  d = rng.uniform(0, 4, (2, 5, 7, 16)).astype(np.float32)
  t = 0.3
  logits = -d.reshape(-1, 16).astype(np.float64) / t
  q = np.exp(logits - logits.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  mean_q = q.mean(0)
  want = -np.mean(np.sum(q * np.log(q), -1)) + np.sum(mean_q * np.log(mean_q))
  np.testing.assert_allclose(float(entropy_penalty(jnp.asarray(d), t)), want, rtol=1e-5)
  own = 4.0 * (1.0 - np.eye(16, dtype=np.float32))   # vector i at distance 0 of code i only
  np.testing.assert_allclose(float(entropy_penalty(jnp.asarray(own), 0.01)), -np.log(16),
                             rtol=1e-5)
  same = np.tile(own[:1], (16, 1))                     # every vector on code 0
  assert abs(float(entropy_penalty(jnp.asarray(same), 0.01))) < 1e-5


def test_entropy_penalty_raises_held_out_use():
  """The paper configs' quantizer with and without the entropy penalty (weight 0.1), same
  data, steps and seeds: the penalty spreads the held-out codes (higher perplexity)."""
  train, held = _scenes(0, 32), _scenes(200, 16)
  res = {}
  with jax.default_matmul_precision("highest"):
    for w in (0.0, 0.1):
      tok = LatentTokenizer(in_channels=3, latent_dim=16, num_codes=256, ch=8,
                            num_res_blocks=1, max_groups=1, l2_normalize=True, lookup_dim=8,
                            entropy_weight=w)
      params = tok.init(jax.random.PRNGKey(0), train[:1])["params"]
      tx = optax.adam(1e-3)
      opt = tx.init(params)

      @jax.jit
      def step(params, opt, x, tok=tok, tx=tx):
        def loss(p):
          out = tok.apply({"params": p}, x)
          return losses.reconstruction_loss(x, out["recon"], "l2") + out["vq_loss"]
        upd, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, upd), opt

      for i in range(8):
        params, opt = step(params, opt, train[(4 * i) % 32:(4 * i) % 32 + 4])
      idx = tok.apply({"params": params}, held, method=LatentTokenizer.encode)["indices"]
      res[w] = float(losses.codebook_usage(idx, 256)["perplexity"])
  print(res)
  assert res[0.1] > 1.5 * res[0.0], res
