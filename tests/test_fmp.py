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


@pytest.mark.parametrize("m", [2, 3])
def test_eq10_and_eq12_match_numpy(m):
    """Single head, global attention; Eq. 9-10 per modality (M=3: keys of the others
    concatenated), Eq. 11-12 from the module's own intermediates and weights."""
    fmp = FusionMaskPrompting(dim=8, num_heads=1, depth_self=1, attention="global")
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
        ref = _np_eq10(qkv[i][0], kk, vv, _f64(cp["ln_scale"]), _f64(cp["ln_bias"]))
        np.testing.assert_allclose(tok(out["z_prime"][i]), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tok(out["z_0"]), sum(tok(z) for z in out["z_prime"]) / m,
                               atol=1e-6)
    cu = p["complementary"]
    q_f = tok(out["z_f_q"]) @ _f64(cu["W_Q"]["kernel"])
    k_0 = tok(out["z_0"]) @ _f64(cu["W_K"]["kernel"])
    v_0 = tok(out["z_0"]) @ _f64(cu["W_V"]["kernel"])
    ref = _np_eq10(q_f, k_0, v_0, _f64(cu["attn"]["ln_scale"]), _f64(cu["attn"]["ln_bias"]),
                   residual=tok(out["z_c"]))
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
