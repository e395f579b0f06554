"""FMP (Algorithm 1, Eq. 9-12), windowed attention, ablation modules, fused-image decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionsam_jax.models.fmp import (ConcatFusion, FusionMaskPrompting,
                                      cross_domain_attention, window_attention)
from fusionsam_jax.models.fused_decoder import FusedImageDecoder, PatchEmbedTokenizer


def _rand(seed, shape, scale=1.0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * scale


# ----------------------------------------------------------------------------- numpy refs

def _np_softmax(a):
  a = a - a.max(-1, keepdims=True)
  e = np.exp(a)
  return e / e.sum(-1, keepdims=True)


def _np_ln(x, g, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * g + b


def _np_eq10(q, k, v, g, b, residual=None, heads=1):
  """LN(softmax(Q K^T / sqrt(d_k)) V) + R, float64, tokens (N, C)."""
  n, c = q.shape
  dk = c // heads
  outs = []
  for h in range(heads):
    sl = slice(h * dk, (h + 1) * dk)
    outs.append(_np_softmax(q[:, sl] @ k[:, sl].T / np.sqrt(dk)) @ v[:, sl])
  return _np_ln(np.concatenate(outs, -1), g, b) + (q if residual is None else residual)


def _f64(x):
  return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("m", [2, 3])
def test_fmp_shapes_small(m):
  """10 x 12 latents, window 4: padding, shifted windows and M-way concatenation."""
  fmp = FusionMaskPrompting(dim=8, num_heads=2, depth_self=2, window_size=4)
  zs = [_rand(i, (2, 10, 12, 6)) for i in range(m)]
  v = jax.jit(fmp.init)(jax.random.PRNGKey(0), zs)
  names = {f"{p}_{i + 1}" for p in ("self_attn", "qkv", "cross") for i in range(m)}
  assert set(v["params"]) == names | {"fusion_conv", "latent_fusion_conv", "complementary",
                                      "out_conv"}
  out = jax.jit(fmp.apply)(v, zs)
  assert out["fusion"].shape == (2, 10, 12, 6)
  for key in ("z_c", "I_f", "z_f_q", "z_0"):
    assert out[key].shape == (2, 10, 12, 8)
  assert len(out["z_prime"]) == len(out["self_features"]) == m
  assert np.isfinite(np.asarray(out["fusion"])).all()


@pytest.mark.parametrize("m", [2, 3])
def test_fmp_shapes_mfnet_latents(m):
  """MFNet at full size: 480 x 640 with s = 4 -> 120 x 160 latents (tiny widths)."""
  fmp = FusionMaskPrompting(dim=8, num_heads=2, depth_self=2, window_size=8)
  zs = [jnp.zeros((1, 120, 160, 8))] * m
  v = jax.eval_shape(fmp.init, jax.random.PRNGKey(0), zs)
  out = jax.eval_shape(fmp.apply, v, zs)
  assert out["fusion"].shape == (1, 120, 160, 8)
  cf = ConcatFusion()
  out = jax.eval_shape(cf.apply, jax.eval_shape(cf.init, jax.random.PRNGKey(0), zs), zs)
  assert out["fusion"].shape == (1, 120, 160, 8)


def test_fmp_runs_at_mfnet_latents():
  fmp = FusionMaskPrompting(dim=8, num_heads=2, depth_self=2, window_size=8)
  zs = [_rand(0, (1, 120, 160, 8)), _rand(1, (1, 120, 160, 8))]
  v = jax.jit(fmp.init)(jax.random.PRNGKey(0), zs)
  out = jax.jit(fmp.apply)(v, zs)
  assert out["fusion"].shape == (1, 120, 160, 8)
  assert np.isfinite(np.asarray(out["fusion"])).all()


def test_ablation_and_decoder_shapes():
  z = _rand(0, (2, 4, 6, 8))
  cf = ConcatFusion()
  v = cf.init(jax.random.PRNGKey(0), [z, z, z])
  assert set(v["params"]) == {"conv"}
  assert cf.apply(v, [z, z, z])["fusion"].shape == (2, 4, 6, 8)
  pe = PatchEmbedTokenizer(latent_dim=8, scale=4)
  x = jnp.zeros((2, 16, 24, 1))
  assert jax.eval_shape(pe.apply, jax.eval_shape(pe.init, jax.random.PRNGKey(0), x),
                        x).shape == (2, 4, 6, 8)
  dec = FusedImageDecoder(ch=8, num_res_blocks=1)
  vd = jax.jit(dec.init)(jax.random.PRNGKey(0), z)
  img = jax.jit(dec.apply)(vd, z)
  assert img.shape == (2, 16, 24, 3)
  assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_fmp_rejects_bad_inputs():
  fmp = FusionMaskPrompting(dim=8, num_heads=2)
  z = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="at least 2"):
    jax.eval_shape(fmp.init, jax.random.PRNGKey(0), [z])
  with pytest.raises(ValueError, match="shape"):
    jax.eval_shape(fmp.init, jax.random.PRNGKey(0), [z, jnp.zeros((1, 4, 5, 8))])


# ----------------------------------------------------------------------------- equations

def test_cross_domain_attention_core_multihead():
  q, k, v = _rand(0, (2, 5, 8)), _rand(1, (2, 7, 8)), _rand(2, (2, 7, 8))
  g, b = 1 + _rand(3, (8,), 0.1), _rand(4, (8,), 0.1)
  r = _rand(5, (2, 5, 8))
  with jax.default_matmul_precision("highest"):
    out = cross_domain_attention(q, k, v, num_heads=2, ln_scale=g, ln_bias=b)
    out_r = cross_domain_attention(q, k, v, num_heads=2, ln_scale=g, ln_bias=b, residual=r)
  for i in range(2):
    ref = _np_eq10(_f64(q[i]), _f64(k[i]), _f64(v[i]), _f64(g), _f64(b), heads=2)
    np.testing.assert_allclose(out[i], ref, atol=1e-5, rtol=1e-5)
    ref_r = _np_eq10(_f64(q[i]), _f64(k[i]), _f64(v[i]), _f64(g), _f64(b),
                     residual=_f64(r[i]), heads=2)
    np.testing.assert_allclose(out_r[i], ref_r, atol=1e-5, rtol=1e-5)


def _randomize(tree, seed):
  """Non-trivial LN affine params so Eq. 10/12 checks see them."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(kk, x.shape)
                            for kk, x in zip(keys, leaves)])


@pytest.mark.parametrize("m,num_heads,cross_num_heads,heads", [
    (2, 1, None, 1), (3, 1, None, 1), (2, 2, 1, 1), (2, 1, 2, 2)])
def test_eq10_and_eq12_match_numpy(m, num_heads, cross_num_heads, heads):
  """Global attention; Eq. 9-10 per modality (M=3: keys of the others concatenated), Eq.
  11-12 from the module's own intermediates and weights, with `heads` heads in the cross
  units (cross_num_heads, else num_heads; the self-attention keeps num_heads)."""
  fmp = FusionMaskPrompting(dim=8, num_heads=num_heads, depth_self=1, attention="global",
                            cross_num_heads=cross_num_heads)
  zs = [_rand(10 + i, (1, 3, 4, 8)) for i in range(m)]
  with jax.default_matmul_precision("highest"):
    v = _randomize(jax.jit(fmp.init)(jax.random.PRNGKey(0), zs), 1)
    out = jax.jit(fmp.apply)(v, zs)
  p = v["params"]
  tok = lambda a: _f64(a).reshape(-1, a.shape[-1])  # (1, h, w, C) -> (h*w, C)
  feats = [tok(f) for f in out["self_features"]]
  qkv = [[f @ _f64(p[f"qkv_{i + 1}"][w]["kernel"]) for w in ("W_Q", "W_K", "W_V")]
         for i, f in enumerate(feats)]
  for i in range(m):
    others = [j for j in range(m) if j != i]
    kk = np.concatenate([qkv[j][1] for j in others])
    vv = np.concatenate([qkv[j][2] for j in others])
    cp = p[f"cross_{i + 1}"]
    ref = _np_eq10(qkv[i][0], kk, vv, _f64(cp["ln_scale"]), _f64(cp["ln_bias"]), heads=heads)
    np.testing.assert_allclose(tok(out["z_prime"][i]), ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(tok(out["z_0"]), sum(tok(z) for z in out["z_prime"]) / m,
                             atol=1e-6)
  cu = p["complementary"]
  q_f = tok(out["z_f_q"]) @ _f64(cu["W_Q"]["kernel"])
  k_0 = tok(out["z_0"]) @ _f64(cu["W_K"]["kernel"])
  v_0 = tok(out["z_0"]) @ _f64(cu["W_V"]["kernel"])
  ref = _np_eq10(q_f, k_0, v_0, _f64(cu["attn"]["ln_scale"]), _f64(cu["attn"]["ln_bias"]),
                 residual=tok(out["z_c"]), heads=heads)
  np.testing.assert_allclose(tok(out["I_f"]), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- windows

def test_window_equals_global_when_one_window_covers_map():
  q, k, v = (_rand(i, (2, 8, 8, 8)) for i in range(3))
  with jax.default_matmul_precision("highest"):
    ref = window_attention(q, k, v, num_heads=2, window_size=None)
    for shift in (False, True):   # shift is dropped when the window covers the map
      out = window_attention(q, k, v, num_heads=2, window_size=8, shift=shift)
      np.testing.assert_allclose(out, ref, atol=1e-6)
  # Whole module: window 8 == global on an 8 x 8 map with the same params.
    zs = [_rand(5, (1, 8, 8, 8)), _rand(6, (1, 8, 8, 8))]
    fw = FusionMaskPrompting(dim=8, num_heads=2, depth_self=2, window_size=8)
    fg = FusionMaskPrompting(dim=8, num_heads=2, depth_self=2, attention="global")
    params = jax.jit(fw.init)(jax.random.PRNGKey(0), zs)
    np.testing.assert_allclose(jax.jit(fw.apply)(params, zs)["fusion"],
                               jax.jit(fg.apply)(params, zs)["fusion"], atol=1e-5)


def test_padded_windows_equal_blockwise_global():
  """10 x 12 map, window 8, no shift: each (cropped) window block attends only to itself."""
  q, k, v = (_rand(i, (1, 10, 12, 4)) for i in range(3))
  with jax.default_matmul_precision("highest"):
    out = window_attention(q, k, v, num_heads=1, window_size=8)
    for rs, cs in ((slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, 12)),
                   (slice(8, 10), slice(0, 8)), (slice(8, 10), slice(8, 12))):
      ref = window_attention(q[:, rs, cs], k[:, rs, cs], v[:, rs, cs], window_size=None)
      np.testing.assert_allclose(out[:, rs, cs], ref, atol=1e-6)


def test_shifted_window_mask_blocks_wrapped_border():
  """16 x 16, window 8, shift 4: the token at (0, 2) shares its shifted window with rows /
  columns 12..15 (wrapped round the border) but may only influence rows 0..3 x cols 0..3."""
  x = _rand(0, (1, 16, 16, 4))
  dx = jnp.zeros_like(x).at[0, 0, 2].set(5.0)
  with jax.default_matmul_precision("highest"):
    base = window_attention(x, x, x, num_heads=1, window_size=8, shift=True)
    pert = window_attention(x + dx, x + dx, x + dx, num_heads=1, window_size=8, shift=True)
  changed = np.abs(np.asarray(pert - base)).max(-1)[0] > 1e-6      # (16, 16)
  expected = np.zeros((16, 16), bool)
  expected[0:4, 0:4] = True
  np.testing.assert_array_equal(changed, expected)
  # Without the shift the same token influences its whole 8 x 8 window.
  base0 = window_attention(x, x, x, num_heads=1, window_size=8)
  pert0 = window_attention(x + dx, x + dx, x + dx, num_heads=1, window_size=8)
  changed0 = np.abs(np.asarray(pert0 - base0)).max(-1)[0] > 1e-6
  expected0 = np.zeros((16, 16), bool)
  expected0[0:8, 0:8] = True
  np.testing.assert_array_equal(changed0, expected0)


# ----------------------------------------------------------------------------- global cross units

def test_chunked_global_attention_matches_numpy():
  """Queries in chunks of 3 (10 queries: the last chunk padded) give the formula's values."""
  from fusionsam_jax.models.fmp import multihead_attention
  q, k, v = _rand(0, (2, 10, 8)), _rand(1, (2, 7, 8)), _rand(2, (2, 7, 8))
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda a, b, c: multihead_attention(a, b, c, num_heads=2,
                                                      query_chunk=3))(q, k, v)
  dk = 4
  for i in range(2):
    qi, ki, vi = _f64(q[i]), _f64(k[i]), _f64(v[i])
    att = np.concatenate([_np_softmax(qi[:, h * dk:(h + 1) * dk]
                                      @ ki[:, h * dk:(h + 1) * dk].T / np.sqrt(dk))
                          @ vi[:, h * dk:(h + 1) * dk] for h in range(2)], -1)
    np.testing.assert_allclose(out[i], att, atol=1e-5, rtol=1e-5)


def _fmp_corner_change(cross_attention):
  """Max |change| of the fused features in the bottom-right 4 x 4 corner when the thermal
  latent changes only in the top-left 2 x 2 corner (16 x 24 map, window 4)."""
  fmp = FusionMaskPrompting(dim=8, num_heads=2, depth_self=2, window_size=4,
                            cross_attention=cross_attention, query_chunk=64)
  rgb, th = _rand(0, (1, 16, 24, 8)), _rand(1, (1, 16, 24, 8))
  th2 = th.at[:, :2, :2].add(3.0 * _rand(2, (1, 2, 2, 8)))
  with jax.default_matmul_precision("highest"):
    params = jax.jit(fmp.init)(jax.random.PRNGKey(0), [rgb, th])
    f = jax.jit(lambda z: fmp.apply(params, [rgb, z]))
    a, b = f(th), f(th2)
  out = {k: np.abs(np.asarray(b[k]) - np.asarray(a[k]))[0, -4:, -4:].max()
         for k in ("fusion", "I_f")}
  out["z_prime_rgb"] = np.abs(np.asarray(b["z_prime"][0])
                              - np.asarray(a["z_prime"][0]))[0, -4:, -4:].max()
  return out


def test_global_cross_units_reach_the_opposite_corner():
  """Sec. 3.2.3's long-range cross-modal exchange: with global cross-domain / complementary
  attention a thermal change in one corner reaches the RGB branch's Eq. 10 output and the
  fused features in the opposite corner. Control: with 4 x 4 windows everywhere (self-
  attention shifted by 2) that corner is bitwise unchanged (the change can travel only a
  few windows through the two shifted blocks and the 3 x 3 convolutions)."""
  g = _fmp_corner_change("global")
  assert g["z_prime_rgb"] > 1e-4 and g["I_f"] > 1e-4 and g["fusion"] > 1e-4, g
  w = _fmp_corner_change("window")
  assert w["z_prime_rgb"] == 0.0 and w["I_f"] == 0.0 and w["fusion"] == 0.0, w


def test_global_cross_units_at_mfnet_size_shapes_and_memory():
  """Paper widths (d_c 64, 4 heads, 2 shifted Swin blocks per modality) on 120 x 160 latents
  with global cross units: shapes of the forward and of the gradient (traced only), and the
  compiled XLA global attention (fwd + bwd, 1024-query chunks, batch 4) needs far less
  temporary memory than one dense score matrix (4 x 4 heads x 19 200^2 float32 = 23.6 GB)."""
  from fusionsam_jax.models.fmp import multihead_attention
  fmp = FusionMaskPrompting(num_heads=4, depth_self=2, window_size=8, cross_attention="global")
  zs = [jax.ShapeDtypeStruct((4, 120, 160, 64), jnp.float32)] * 2
  v = jax.eval_shape(fmp.init, jax.random.PRNGKey(0), zs)
  out = jax.eval_shape(fmp.apply, v, zs)
  assert out["fusion"].shape == (4, 120, 160, 64) and out["I_f"].shape == (4, 120, 160, 64)
  g = jax.eval_shape(jax.grad(lambda p, z: jnp.sum(fmp.apply(p, z)["fusion"])), v, zs)
  assert g["params"]["cross_1"]["ln_scale"].shape == (64,)

  n = 120 * 160
  t = jax.ShapeDtypeStruct((4, n, 64), jnp.float32)
  loss = lambda q, k, vv: jnp.sum(multihead_attention(q, k, vv, num_heads=4,
                                                      query_chunk=1024))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(t, t, t).compile()
  mem = compiled.memory_analysis()
  dense = 4 * 4 * n * n * 4
  assert mem.temp_size_in_bytes < dense / 4, mem.temp_size_in_bytes  # measured 3.9 GB
