"""Losses against independent numpy / scikit-image / scipy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fusionsam_jax import losses as L


def _smooth_images(rng, shape, sigma=2.0):
  """Random images in [0, 1] with some spatial structure, (B, H, W, C)."""
  x = rng.random(shape)
  x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0))
  x = (x - x.min()) / (x.max() - x.min())
  return x.astype(np.float32)


# ----------------------------------------------------------------------------- SSIM


def test_dm_pix_ssim_matches_skimage():
  """dm_pix.ssim ('valid' 11x11 Gaussian window) vs skimage's Gaussian SSIM.

  skimage filters the whole image with reflect padding and then averages the map with a
  5-pixel border cropped; dm_pix's map is exactly that interior (valid convolution). So
  both the mean and the interior map are compared.
  """
  import dm_pix
  from skimage.metrics import structural_similarity

  rng = np.random.default_rng(0)
  a = _smooth_images(rng, (3, 40, 52, 1), sigma=1.5)
  b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  ours = np.asarray(dm_pix.ssim(a, b, max_val=1.0))
  maps = np.asarray(dm_pix.ssim(a, b, max_val=1.0, return_map=True))
  for i in range(a.shape[0]):
    ref, full = structural_similarity(
        a[i, ..., 0].astype(np.float64), b[i, ..., 0].astype(np.float64),
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        full=True)
    assert ours[i] == pytest.approx(ref, abs=1e-4)
    np.testing.assert_allclose(maps[i, ..., 0], full[5:-5, 5:-5], atol=1e-4)


# ----------------------------------------------------------------------------- helpers


def test_rgb_to_y_and_sobel():
  x = np.array([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]], np.float32)
  np.testing.assert_allclose(np.asarray(L.rgb_to_y(x))[..., 0], [[[0.299, 0.587, 0.114]]],
                             rtol=1e-6)
  rng = np.random.default_rng(1)
  img = rng.random((2, 13, 17, 3)).astype(np.float32)
  gx, gy = (np.asarray(g) for g in L.sobel(img))
  assert gx.shape == img.shape
  for b in range(2):
    for c in range(3):
      ch = img[b, ..., c].astype(np.float64)
      np.testing.assert_allclose(gx[b, ..., c], ndimage.sobel(ch, axis=1, mode="nearest"),
                                 atol=1e-5)
      np.testing.assert_allclose(gy[b, ..., c], ndimage.sobel(ch, axis=0, mode="nearest"),
                                 atol=1e-5)
# a horizontal ramp: constant gx = 8 * slope inside, half of that at the replicated edge
  ramp = np.tile(np.arange(6, dtype=np.float32), (5, 1))[None, ..., None]
  rgx, rgy = (np.asarray(g)[0, ..., 0] for g in L.sobel(ramp))
  np.testing.assert_allclose(rgx[:, 1:-1], 8.0)
  np.testing.assert_allclose(rgx[:, 0], 4.0)
  np.testing.assert_allclose(rgy, 0.0)


# ----------------------------------------------------------------------------- fusion loss


def _np_grad_mag(g):
  """|sobel_x| + |sobel_y| per image with edge padding, via scipy; g: (B, H, W)."""
  out = np.empty_like(g)
  for i in range(g.shape[0]):
    out[i] = (np.abs(ndimage.sobel(g[i], axis=1, mode="nearest"))
              + np.abs(ndimage.sobel(g[i], axis=0, mode="nearest")))
  return out


def _np_fusion_terms(fused, sources, weighting="equal"):
  from skimage.metrics import structural_similarity

  f = fused.astype(np.float64)
  yf = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
  greys = []
  for s in sources:
    s = s.astype(np.float64)
    greys.append(s[..., 0] if s.shape[-1] == 1
                 else 0.299 * s[..., 0] + 0.587 * s[..., 1] + 0.114 * s[..., 2])
  grads = [_np_grad_mag(g) for g in greys]
  if weighting == "equal":
    coef = [1 / len(greys)] * len(greys)
  else:
    m = np.array([g.mean() for g in grads])
    coef = m / m.sum()
  ssims = [np.mean([structural_similarity(yf[b], g[b], gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0)
                    for b in range(yf.shape[0])]) for g in greys]
  ssim_loss = sum(c * (1 - s) for c, s in zip(coef, ssims))
  intensity = np.mean(np.abs(yf - np.maximum.reduce(greys)))
  gradient = np.mean(np.abs(_np_grad_mag(yf) - np.maximum.reduce(grads)))
  return {"ssim": ssim_loss, "intensity": intensity, "gradient": gradient,
          **{f"ssim_src{i}": s for i, s in enumerate(ssims)}}


@pytest.mark.parametrize("weighting", ["equal", "gradient"])
def test_fusion_loss_matches_numpy(weighting):
  rng = np.random.default_rng(2)
  vis = _smooth_images(rng, (2, 32, 40, 3))
  ir = _smooth_images(rng, (2, 32, 40, 1), sigma=3.0)
  fused = np.clip(0.5 * vis + 0.5 * ir + 0.05 * rng.standard_normal(vis.shape), 0, 1
                  ).astype(np.float32)
  weights = {"ssim": 2.0, "intensity": 3.0, "gradient": 5.0}
  with jax.default_matmul_precision("highest"):
    total, terms = jax.jit(lambda f, a, b: L.fusion_loss(
        f, [a, b], weights, ssim_weighting=weighting))(fused, vis, ir)
  ref = _np_fusion_terms(fused, [vis, ir], weighting)
  for k, v in ref.items():
    assert float(terms[k]) == pytest.approx(v, abs=1e-4), k
  expect = 2.0 * ref["ssim"] + 3.0 * ref["intensity"] + 5.0 * ref["gradient"]
  assert float(total) == pytest.approx(expect, abs=1e-3)


def test_fusion_loss_defaults_gradient_and_errors():
  rng = np.random.default_rng(3)
  vis = _smooth_images(rng, (1, 24, 24, 3))
  ir = _smooth_images(rng, (1, 24, 24, 1))
  fused = jnp.asarray(vis)
  total, terms = L.fusion_loss(fused, [vis, ir])
  w = L.DEFAULT_FUSION_WEIGHTS
  assert w == {"ssim": 10.0, "intensity": 20.0, "gradient": 20.0}
  assert float(total) == pytest.approx(
      w["ssim"] * float(terms["ssim"]) + w["intensity"] * float(terms["intensity"])
      + w["gradient"] * float(terms["gradient"]), rel=1e-5)
  g = jax.grad(lambda f: L.fusion_loss(f, [vis, ir])[0])(fused)
  assert g.shape == fused.shape and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).sum()) > 0
  # three modalities work too (RGB + depth + thermal)
  t3, _ = L.fusion_loss(fused, [vis, ir, ir[..., :1] * 0.5])
  assert np.isfinite(float(t3))
  with pytest.raises(ValueError):
    L.fusion_loss(fused, [vis, ir], {"ssim_weight": 1.0})
  with pytest.raises(ValueError):
    L.fusion_loss(fused, [np.zeros((1, 24, 24, 2), np.float32)])


# ----------------------------------------------------------------------------- segmentation


def _np_seg_loss(logits, labels, ignore=255, dice_weight=1.0, smooth=1.0):
  x = logits.astype(np.float64)
  c = x.shape[-1]
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  valid = labels != ignore
  lv = labels[valid]
  ce = -logp[valid][np.arange(lv.size), lv].mean() if lv.size else 0.0
  p = np.exp(logp[valid])  # (N, C)
  y = np.eye(c)[lv]
  dice_c = [(2 * (p[:, k] * y[:, k]).sum() + smooth) / (p[:, k].sum() + y[:, k].sum() + smooth)
            for k in range(c)]
  dice = 1 - np.mean(dice_c)
  return ce + dice_weight * dice, ce, dice


def test_segmentation_loss_matches_numpy_and_ignores():
  rng = np.random.default_rng(4)
  b, h, w, c = 2, 12, 16, 5
  logits = (3 * rng.standard_normal((b, h, w, c))).astype(np.float32)
  labels = rng.integers(0, c - 1, (b, h, w))  # class c-1 absent from the labels
  labels[rng.random((b, h, w)) < 0.2] = 255
  fn = jax.jit(lambda lo, la: L.segmentation_loss(lo, la, dice_weight=0.7))
  total, terms = fn(logits, labels)
  ref_total, ref_ce, ref_dice = _np_seg_loss(logits, labels, dice_weight=0.7)
  assert float(terms["ce"]) == pytest.approx(ref_ce, rel=1e-5)
  assert float(terms["dice"]) == pytest.approx(ref_dice, rel=1e-5)
  assert float(total) == pytest.approx(ref_total, rel=1e-5)
  assert float(terms["num_valid"]) == (labels != 255).sum()

  # changing logits at ignored pixels changes nothing
  ign = labels == 255
  logits2 = np.where(ign[..., None], 50 * rng.standard_normal(logits.shape), logits
                     ).astype(np.float32)
  total2, _ = fn(logits2, labels)
  assert float(total2) == float(total)

  # finite gradient, zero at ignored pixels
  g = jax.grad(lambda lo: L.segmentation_loss(lo, labels)[0])(jnp.asarray(logits))
  g = np.asarray(g)
  assert np.all(np.isfinite(g)) and np.abs(g[~ign]).sum() > 0
  assert np.all(g[ign] == 0)


def test_segmentation_loss_edge_cases():
  logits = jnp.zeros((1, 4, 4, 3))
  total, terms = L.segmentation_loss(logits, jnp.full((1, 4, 4), 255))
  assert float(total) == 0.0 and float(terms["ce"]) == 0.0
  g = jax.grad(lambda lo: L.segmentation_loss(lo, jnp.full((1, 4, 4), 255))[0])(logits)
  assert bool(jnp.all(jnp.isfinite(g)))
  # perfect confident prediction: CE ~ 0, Dice ~ 0
  labels = jnp.array([[[0, 1], [2, 1]]])
  perfect = 40.0 * jax.nn.one_hot(labels, 3)
  total, terms = L.segmentation_loss(perfect, labels)
  assert float(terms["ce"]) < 1e-6 and float(terms["dice"]) < 1e-6
  # bfloat16 logits are computed in float32
  t16, _ = L.segmentation_loss(perfect.astype(jnp.bfloat16), labels)
  assert t16.dtype == jnp.float32
  with pytest.raises(ValueError):
    L.segmentation_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5), jnp.int32))


# ----------------------------------------------------------------------------- VQ / GAN


def test_codebook_usage():
  k = 8
  uniform = jnp.tile(jnp.arange(k), 5).reshape(5, k)
  u = jax.jit(L.codebook_usage, static_argnums=1)(uniform, k)
  assert float(u["perplexity"]) == pytest.approx(k, rel=1e-5)
  assert int(u["dead_codes"]) == 0 and float(u["dead_fraction"]) == 0.0
  one = L.codebook_usage(jnp.full((3, 4, 4), 5), k)
  assert float(one["perplexity"]) == pytest.approx(1.0)
  assert int(one["dead_codes"]) == k - 1
  assert float(one["dead_fraction"]) == pytest.approx((k - 1) / k)
  # p = (1/2, 1/4, 1/4): perplexity = 2^(1.5)
  mix = L.codebook_usage(jnp.array([0, 0, 1, 2]), 4)
  assert float(mix["perplexity"]) == pytest.approx(2 ** 1.5, rel=1e-5)
  np.testing.assert_array_equal(mix["counts"], [2, 1, 1, 0])


def test_gan_pieces():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
  assert float(L.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1))
  assert float(L.generator_adv_loss(fake)) == pytest.approx(1 / 3)

  assert float(L.adaptive_adv_weight(2.0, 1.0)) == pytest.approx(2.0 / (1.0 + 1e-4))
  assert float(L.adaptive_adv_weight(1.0, 0.0)) == pytest.approx(1e4)
  assert float(L.adaptive_adv_weight(1.0, 0.0, max=10.0)) == 10.0
  gx = jax.grad(lambda a, b: L.adaptive_adv_weight(a, b), argnums=(0, 1))(2.0, 1.0)
  assert float(gx[0]) == 0.0 and float(gx[1]) == 0.0

  f = jax.jit(L.adopt_weight)
  assert float(f(0.8, 99, 100)) == 0.0
  assert float(f(0.8, 100, 100)) == pytest.approx(0.8)
  assert float(f(0.8, jnp.int32(5000), 100)) == pytest.approx(0.8)


def test_reconstruction_loss_is_eq5():
  """Eq. 5: squared L2 per element ("l2", the paper) or mean absolute error ("l1")."""
  rng = np.random.default_rng(0)
  x, r = rng.random((2, 5, 6, 3)), rng.random((2, 5, 6, 3))
  assert float(L.reconstruction_loss(x, r)) == pytest.approx(((x - r) ** 2).sum() / x.size,
                                                             rel=1e-5)
  assert float(L.reconstruction_loss(x, r, "l1")) == pytest.approx(
      np.abs(x - r).sum() / x.size, rel=1e-5)
  g = jax.grad(lambda a: L.reconstruction_loss(a, r))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(g, 2 * (x - r) / x.size, rtol=1e-4, atol=1e-9)
  with pytest.raises(ValueError, match="rec_loss"):
    L.reconstruction_loss(x, r, "l3")


def test_disc_start_step():
  assert L.disc_start_step(None, 40) == 20              # follows num_steps
  assert L.disc_start_step(None, 30, 0.25) == 7
  assert L.disc_start_step(12, 40) == 12                # absolute when given
  assert L.disc_start_step(None, None) == 0
  assert L.disc_start_step(10 ** 9, 300, disc_weight=0.0) == 10 ** 9   # adversarial off
  assert L.disc_start_step(2, 0) == 2                   # a skipped (0-step) stage: no check
  with pytest.raises(ValueError, match="never train"):
    L.disc_start_step(9800, 30, disc_weight=0.8)


def test_disc_lr_schedule():
  f = L.disc_lr_schedule(1e-4, 5)
  assert [float(f(i)) for i in (0, 4, 5, 100)] == [0.0, 0.0, pytest.approx(1e-4),
                                                   pytest.approx(1e-4)]
