"""LSTG tokenizer (Eq. 2-6) and PatchGAN discriminator: shapes, quantizer, straight-through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionsam_jax.models.discriminator import PatchGANDiscriminator
from fusionsam_jax.models.lstg import LatentTokenizer, VectorQuantizer, resolve_ch_mult

TINY = dict(latent_dim=8, num_codes=64, ch=8, num_res_blocks=1, scale=4)


def _init(module, x, seed=0):
  return jax.jit(module.init)(jax.random.PRNGKey(seed), x)


def test_tokenizer_shapes_and_methods(in_channels=3):
  tok = LatentTokenizer(in_channels=in_channels, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 24, in_channels))
  v = _init(tok, x)
  assert set(v["params"]) == {"encoder", "quantizer", "decoder"}
  assert v["params"]["quantizer"]["codebook"].shape == (64, 8)
  assert v["params"]["decoder"]["conv_out"]["kernel"].shape[-1] == in_channels
  out = jax.jit(tok.apply)(v, x)
  assert out["z"].shape == out["z_q"].shape == (2, 4, 6, 8)
  assert out["indices"].shape == (2, 4, 6) and out["indices"].dtype == jnp.int32
  assert out["recon"].shape == x.shape
  for key in ("codebook_loss", "commitment_loss", "vq_loss"):
    assert out[key].shape == () and np.isfinite(out[key])
  np.testing.assert_allclose(out["vq_loss"], out["codebook_loss"] + out["commitment_loss"],
                             rtol=1e-6)
  enc = jax.jit(lambda v_, x_: tok.apply(v_, x_, method=tok.encode))(v, x)
  np.testing.assert_array_equal(enc["indices"], out["indices"])
  rec, rec_i = jax.jit(lambda v_, e: (tok.apply(v_, e["z_q"], method=tok.decode),
                                      tok.apply(v_, e["indices"], method=tok.decode_indices))
                       )(v, enc)
  np.testing.assert_allclose(rec, out["recon"], atol=1e-5)
  np.testing.assert_allclose(rec_i, out["recon"], atol=1e-5)


def test_tokenizer_mfnet_size():
  """480 x 640 input with s = 4 -> 120 x 160 latents (tiny widths)."""
  tok = LatentTokenizer(in_channels=1, latent_dim=8, num_codes=64, ch=4, num_res_blocks=1)
  x = jnp.zeros((1, 480, 640, 1))
  v = jax.eval_shape(tok.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(tok.apply, v, x)
  assert out["z_q"].shape == (1, 120, 160, 8)
  assert out["recon"].shape == (1, 480, 640, 1)


def test_scale_config():
  assert resolve_ch_mult(4, None) == (1, 2, 2)
  assert resolve_ch_mult(8, None) == (1, 2, 2, 2)
  with pytest.raises(ValueError, match="power of two"):
    resolve_ch_mult(3, None)
  with pytest.raises(ValueError, match="ch_mult"):
    resolve_ch_mult(4, (1, 2))
  tok = LatentTokenizer(in_channels=3, latent_dim=4, num_codes=16, ch=4, num_res_blocks=1,
                        scale=8)
  x = jnp.zeros((1, 32, 32, 3))
  out = jax.eval_shape(tok.apply, jax.eval_shape(tok.init, jax.random.PRNGKey(0), x), x)
  assert out["z_q"].shape == (1, 4, 4, 4) and out["recon"].shape == x.shape
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(tok.init, jax.random.PRNGKey(0), jnp.zeros((1, 30, 32, 3)))


@pytest.mark.parametrize("l2", [False, True])
def test_quantizer_picks_nearest_code(l2):
  vq = VectorQuantizer(num_codes=32, code_dim=6, l2_normalize=l2)
  z = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 7, 6)) * 0.05
  cb = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (32, 6)) * 0.05)
  v = {"params": {"codebook": jnp.asarray(cb)}}
  out = jax.jit(vq.apply)(v, z)
  zz = np.asarray(z, np.float64)
  c = cb.astype(np.float64)
  if l2:
    zz = zz / np.linalg.norm(zz, axis=-1, keepdims=True)
    c = c / np.linalg.norm(c, axis=-1, keepdims=True)
  d = ((zz[..., None, :] - c) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(out["indices"]), d.argmin(-1))
  np.testing.assert_allclose(np.asarray(out["z_q"]), c[d.argmin(-1)], atol=1e-6)
  np.testing.assert_allclose(out["codebook_loss"], ((zz - c[d.argmin(-1)]) ** 2).mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(out["commitment_loss"],
                             0.25 * ((zz - c[d.argmin(-1)]) ** 2).mean(), rtol=1e-4)


def _flat_norms(tree):
  return {jax.tree_util.keystr(k): float(jnp.abs(x).sum())
          for k, x in jax.tree_util.tree_leaves_with_path(tree)}


def _close(a, b, rel=1e-4):
  """float32 gradients summed in different orders: compare relative to the largest entry."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=rel * max(np.abs(b).max(), 1e-12))


def test_straight_through_and_loss_gradients():
    # scale 2 keeps the graph (and its compile time) small; the property is scale-free.
  tok = LatentTokenizer(in_channels=3, **{**TINY, "scale": 2})
  x = jax.random.uniform(jax.random.PRNGKey(5), (1, 8, 8, 3))
  v = _init(tok, x)
  w = jax.random.normal(jax.random.PRNGKey(6), (1, 4, 4, 8))

  def enc(p):
    return tok.apply({"params": p}, x, method=tok.encode)

  def rec_loss(p):
    return jnp.mean(jnp.square(tok.apply({"params": p}, x)["recon"] - x))

  @jax.jit
  def all_grads(p):
    g = {}
    # Linear loss on z_q vs. the same loss on z: identical gradients (straight-through).
    g["zq"] = jax.grad(lambda p_: jnp.sum(w * enc(p_)["z_q"]))(p)
    g["z"] = jax.grad(lambda p_: jnp.sum(w * enc(p_)["z"]))(p)
    # Reconstruction path: d rec / d enc = VJP of the encoder at cotangent d rec / d z_q.
    zq = enc(p)["z_q"]
    ct = jax.lax.stop_gradient(jax.grad(lambda zq_: jnp.mean(jnp.square(
        tok.apply({"params": p}, zq_, method=tok.decode) - x)))(zq))
    g["rec"] = jax.grad(rec_loss)(p)
    g["vjp"] = jax.grad(lambda p_: jnp.sum(ct * enc(p_)["z"]))(p)
    # Eq. 6 terms.
    g["cb"] = jax.grad(lambda p_: enc(p_)["codebook_loss"])(p)
    g["cm"] = jax.grad(lambda p_: enc(p_)["commitment_loss"])(p)
    return g

  with jax.default_matmul_precision("highest"):
    g = all_grads(v["params"])
  leaves = jax.tree_util.tree_leaves
  assert sum(float(jnp.abs(a).sum()) for a in leaves(g["zq"]["encoder"])) > 0
  for a, b in zip(leaves(g["zq"]["encoder"]), leaves(g["z"]["encoder"])):
    _close(a, b)
  assert all(float(jnp.abs(a).sum()) == 0 for a in leaves(g["zq"]["quantizer"]))
  assert sum(float(jnp.abs(a).sum()) for a in leaves(g["rec"]["encoder"])) > 0
  for a, b in zip(leaves(g["rec"]["encoder"]), leaves(g["vjp"]["encoder"])):
    _close(a, b)
# codebook loss -> codebook only; commitment -> encoder only.
  n_cb, n_cm = _flat_norms(g["cb"]), _flat_norms(g["cm"])
  assert n_cb["['quantizer']['codebook']"] > 0
  assert all(val == 0 for k, val in n_cb.items() if "quantizer" not in k)
  assert n_cm["['quantizer']['codebook']"] == 0
  assert sum(val for k, val in n_cm.items() if "encoder" in k) > 0
  assert all(val == 0 for k, val in n_cm.items() if "decoder" in k)


def test_patchgan_shapes():
  d = PatchGANDiscriminator(base_ch=8, n_layers=3)
  x = jnp.zeros((2, 64, 64, 3))
  v = jax.eval_shape(d.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(d.apply, v, x).shape == (2, 6, 6, 1)
  d1 = PatchGANDiscriminator(base_ch=4, n_layers=2, norm="none")
  x1 = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 1))
  out = jax.jit(d1.apply)(_init(d1, x1), x1)
  assert out.shape == (1, 6, 6, 1) and np.isfinite(out).all()


def test_quantizer_lookup_and_codebook_gradient_have_no_scatter():
  """The code lookup equals numpy's gather and its codebook gradient equals the gather's
  (np.add.at), computed without a scatter: a scatter-add's atomics serialise as the codes
  collapse onto a few entries, which made the tokenizer step several times slower on GPU."""
  q = VectorQuantizer(num_codes=16, code_dim=4)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 4))
  cb = q.init(jax.random.PRNGKey(1), z)["params"]["codebook"]
  out = q.apply({"params": {"codebook": cb}}, z)
  idx = np.asarray(out["indices"])
  np.testing.assert_array_equal(np.asarray(out["z_q"] - z + z),
                                np.asarray(z + (np.asarray(cb)[idx] - z)))

  def loss(c):
    return q.apply({"params": {"codebook": c}}, z)["codebook_loss"]

  g = np.asarray(jax.grad(loss)(cb))
  want = np.zeros_like(np.asarray(cb))
  diff = (np.asarray(cb)[idx] - np.asarray(z)) * 2.0 / z.size
  np.add.at(want, idx.reshape(-1), diff.reshape(-1, 4))
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  hlo = jax.jit(jax.grad(loss)).lower(cb).as_text()
  assert "scatter" not in hlo
