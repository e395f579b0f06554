"""The fused attention paths of the image encoder compute SAM's attention exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionsam_jax.models.sam.image_encoder import Attention, ImageEncoderViT


def _numpy_attention(x, p, nh):
  """SAM's windowless attention with decomposed rel-pos, in float64 numpy."""
  b, h, w, d = x.shape
  hd = d // nh
  qkv = x.reshape(b, h * w, d) @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  qkv = qkv.reshape(b, h * w, 3, nh, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv  # (b, nh, N, hd)
  attn = (q * hd ** -0.5) @ k.transpose(0, 1, 3, 2)
  idx_h = np.arange(h)[:, None] - np.arange(h)[None, :] + h - 1
  idx_w = np.arange(w)[:, None] - np.arange(w)[None, :] + w - 1
  rh, rw = p["rel_pos_h"][idx_h], p["rel_pos_w"][idx_w]  # (h, kh, hd), (w, kw, hd)
  rq = q.reshape(b, nh, h, w, hd)
  rel_h = np.einsum("bnhwc,hkc->bnhwk", rq, rh)
  rel_w = np.einsum("bnhwc,wkc->bnhwk", rq, rw)
  attn = (attn.reshape(b, nh, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :])
  attn = attn.reshape(b, nh, h * w, h * w)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, h, w, d)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("impl", ["xla", "fused", "fused_bias"])
@pytest.mark.parametrize("hw", [(5, 5), (6, 4)])
def test_attention_matches_formula(impl, hw):
  h, w = hw
  d, nh = 32, 4
  x = np.random.default_rng(0).normal(size=(2, h, w, d)).astype(np.float32)
  mod = Attention(d, nh, use_rel_pos=True, input_size=(h, w), attn_impl=impl)
  params = mod.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32), params)
  with jax.default_matmul_precision("highest"):
    got = mod.apply({"params": params}, jnp.asarray(x))
  want = _numpy_attention(x.astype(np.float64),
                          jax.tree.map(lambda a: np.asarray(a, np.float64), params), nh)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_windowed_block_matches_official_order():
  """Projecting before padding (fill = qkv(0)) equals SAM's pad-then-project order."""
  from fusionsam_jax.models.sam.image_encoder import window_partition, window_unpartition
  d, nh, ws = 16, 2, 3
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 8, d)), jnp.float32)
  win = Attention(d, nh, use_rel_pos=True, input_size=(ws, ws), window_size=ws)
  params = win.init(jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32), params)
  plain = Attention(d, nh, use_rel_pos=True, input_size=(ws, ws))  # SAM's order, by hand
  with jax.default_matmul_precision("highest"):
    got = win.apply({"params": params}, x)
    xw, pad_hw = window_partition(x, ws)
    want = window_unpartition(plain.apply({"params": params}, xw), ws, pad_hw, (7, 8))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_encoder_impls_agree_bf16():
  """bf16 fast path vs float32 reference on a small encoder: the looser bf16 tolerance."""
  kw = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=16,
            window_size=3, global_attn_indexes=(1,))  # 8x8 grid: windows need padding
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
  ref = ImageEncoderViT(**kw)
  params = ref.init(jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), params)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(ref.apply({"params": params}, x))
    for impl in ("fused", "fused_bias"):
      got = ImageEncoderViT(**kw, attn_impl=impl).apply({"params": params}, x)
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max())
  fast = ImageEncoderViT(**kw, attn_impl="fused", dtype=jnp.bfloat16)
  got = np.asarray(fast.apply({"params": params}, x.astype(jnp.bfloat16)), np.float32)
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert err < 3e-2, err
