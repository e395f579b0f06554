"""FusionSAM assembled: shapes, gradient flow per stage, SAM weight loading, ablations,
and overfitting one generated batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from fusionsam_jax.models import functional as F
from fusionsam_jax.stages import common as C
from fusionsam_jax.stages import fusion as fusion_stage
from fusionsam_jax.stages import segmentation as seg_stage
from fusionsam_jax.stages import tokenizer as tok_stage

STAGE_TRAINABLE = {"tokenizer": tok_stage.trainable, "fusion": fusion_stage.trainable,
                   "segmentation": seg_stage.trainable}


def _seg_loss(model, cfg):
  return seg_stage.loss_fn(model, cfg, ConfigDict(dict(dice_weight=1.0)),
                           ConfigDict(dict(weights=None)))
from fusionsam_jax.models.fusionsam import (CHANNELS, FusionSAM, build_model, dummy_images,
                                            init_discriminators, init_params, load_sam_weights)
from fusionsam_jax.metrics.miou import ConfusionMatrix


def tiny_cfg(**over):
  cfg = ConfigDict(dict(
      modalities=("rgb", "thermal"), num_classes=5, sam_variant="tiny", scale=4,
      tokenizer_kind="lstg", fusion="fmp",
      tokenizer=dict(latent_dim=8, num_codes=32, ch=8, num_res_blocks=1),
      fmp=dict(num_heads=2, depth_self=1, window_size=4), fused_decoder=dict(ch=8, num_res_blocks=1),
      discriminator=dict(base_ch=8, n_layers=2), num_points=4, freeze_fmp_in_segmentation=True))
  cfg.update(over)
  return cfg


def _batch(cfg, hw=(32, 48), b=2, seed=0):
  rng = np.random.default_rng(seed)
  batch = {m: rng.integers(0, 256, (b,) + hw + (CHANNELS[m],), dtype=np.uint8)
           for m in cfg.modalities}
  batch["label"] = rng.integers(0, cfg.num_classes, (b,) + hw).astype(np.int32)
  batch["label"][:, :2] = 255
  return batch


@pytest.fixture(scope="module")
def built():
  cfg = tiny_cfg()
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0), (32, 48))
  return cfg, model, params


# RGB-T shapes are also what every training / CLI test runs; the default run keeps RGB-D-T.
@pytest.mark.parametrize("mods", [pytest.param(("rgb", "thermal"), marks=pytest.mark.extended),
                                  ("rgb", "depth", "thermal")])
def test_output_shapes(mods):
  cfg = tiny_cfg(modalities=mods)
  model = build_model(cfg)
  for hw, run in (((32, 48), True), ((480, 640), False)):
    images = dummy_images(model, hw, 2)
    f = lambda p, x: model.apply({"params": p}, x)
    if run:
      params = init_params(model, jax.random.PRNGKey(0), hw)
      out = jax.jit(f)(params, images)
    else:  # MFNet size: shape inference only (CPU time)
      params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), hw))
      out = jax.eval_shape(f, params, images)
    h, w = hw
    assert out["logits"].shape == (2, h, w, 5)
    assert out["fused"].shape == (2, h, w, 3)
    assert out["fusion"].shape == (2, h // 4, w // 4, 8)
    assert out["image_embeddings"].shape == (2, 16, 16, 64)
    assert out["points"].shape == (2, 4, 2)
    if run:
      fused = np.asarray(out["fused"])
      assert fused.min() >= 0 and fused.max() <= 1


def _nonzero(tree):
  return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))


def test_segmentation_gradients(built):
  cfg, model, params = built
  batch = _batch(cfg)
  for freeze in (True, False):
    c = tiny_cfg(freeze_fmp_in_segmentation=freeze)
    loss_fn = _seg_loss(model, c)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.PRNGKey(0), 0)[0]))(params)
    for name in seg_stage.trainable(c):
      top, *rest = name.split("/")
      sub = grads[top]
      for r in rest:
        sub = sub[r]
      assert _nonzero(sub), (freeze, name)
    # The SAM image encoder gets exactly zero gradient: it is frozen and never differentiated.
    assert not _nonzero(grads["image_encoder"])
    # Eq. 1 jointly (not frozen): f_s + f_f reach the tokenizers, FMP and the fused decoder.
    for name in ("tokenizer_rgb", "tokenizer_thermal", "fmp", "fused_decoder"):
      assert _nonzero(grads[name]) == (not freeze), (freeze, name)


def test_fusion_and_tokenizer_gradients(built):
  cfg, model, params = built
  batch = _batch(cfg)
  f = fusion_stage.loss_fn(model, cfg, ConfigDict(dict(weights=None)))
  grads = jax.jit(jax.grad(lambda p: f(p, batch, None, 0)[0]))(params)
  assert _nonzero(grads["fmp"]) and _nonzero(grads["fused_decoder"])
  assert not _nonzero(grads["tokenizer_rgb"]) and not _nonzero(grads["image_encoder"])
  disc = init_discriminators(cfg, jax.random.PRNGKey(1), (32, 48))
  g_fn, d_fn = tok_stage.losses_fn(model, cfg, ConfigDict(dict(disc_weight=0.8)), 0)
  (loss, (aux, carry)), gg = jax.jit(jax.value_and_grad(
      lambda p: g_fn(p, disc, batch, None, jnp.asarray(5)), has_aux=True))(params)
  for m in cfg.modalities:
    assert _nonzero(gg[f"tokenizer_{m}"]["encoder"]) and _nonzero(gg[f"tokenizer_{m}"]["decoder"])
    assert _nonzero(gg[f"tokenizer_{m}"]["quantizer"])
    assert float(aux[f"{m}/adaptive_weight"]) > 0
    assert 1 <= float(aux[f"{m}/perplexity"]) <= 32
  assert not _nonzero(gg["fmp"]) and not _nonzero(gg["mask_decoder"])
  dg = jax.jit(jax.grad(lambda d: d_fn(d, carry, batch, None, jnp.asarray(5))[0]))(disc)
  assert all(_nonzero(dg[m]) for m in cfg.modalities)
  # Before the discriminator start step the adversarial terms are off.
  g0, d0 = tok_stage.losses_fn(model, cfg, ConfigDict(dict(disc_weight=0.8)), 10)
  assert not _nonzero(jax.jit(jax.grad(lambda d: d0(d, carry, batch, None, jnp.asarray(5))[0]))(
      disc))


def test_load_sam_weights(built, tmp_path):
  """Converted SAM weights land in the SAM-derived parts; the d_c-channel dense prompt conv
  responds to a constant map exactly as SAM's 1-channel conv does."""
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
  from fusionsam_jax.models.sam.checkpoint import save_sam_checkpoint
  cfg, model, params = built
  sam_cfg = SAM_PRESETS["tiny"]
  sam_params = Sam(sam_cfg).init_params(jax.random.PRNGKey(7))
  save_sam_checkpoint(str(tmp_path / "sam"), sam_cfg, sam_params)
  loaded = load_sam_weights(params, str(tmp_path / "sam"), cfg)
  np.testing.assert_array_equal(loaded["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                sam_params["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
  mt = np.asarray(sam_params["mask_decoder"]["mask_tokens"]["embedding"])
  np.testing.assert_array_equal(loaded["mask_decoder"]["class_tokens"], mt[np.arange(5) % 4])
  sam = Sam(sam_cfg)
  const = jnp.full((1, 64, 64, 1), 0.7)
  _, want = sam.apply({"params": sam_params}, mask_inputs=const, method=Sam.prompt_embeddings)
  _, got = model.apply({"params": loaded}, None, None, jnp.full((1, 64, 64, 8), 0.7),
                       method=lambda m, *a: m.prompt_encoder(*a))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # A SAM checkpoint of another size is refused with a clear error.
  from fusionsam_jax.models.sam.checkpoint import CheckpointError
  other = build_model(tiny_cfg(sam_variant="vit_b"))
  abstract = jax.eval_shape(lambda: init_params(other, jax.random.PRNGKey(0), (32, 48)))
  with pytest.raises(CheckpointError, match="sam_variant"):
    load_sam_weights(abstract, str(tmp_path / "sam"), cfg)


@pytest.mark.parametrize("low,frame,content,out", [(16, 64, (48, 64), (96, 128)),
                                                  (64, 256, (192, 256), (480, 640)),
                                                  (16, 64, (64, 40), (50, 31)),
                                                  (256, 1024, (768, 1024), (480, 640))])
def test_postprocess_masks_equals_sam_resize_chain(low, frame, content, out):
  """The composed per-axis matrices give SAM's resize -> crop -> resize, as
  `Sam.postprocess_masks` runs it (`F.interpolate`, bilinear, align_corners=False), here in
  float64. (JAX's own float32 resize chain is 1.6e-5-3.3e-5 off that at the SAM sizes.)"""
  import torch
  import torch.nn.functional as F
  from fusionsam_jax.models.fusionsam import postprocess_masks
  m = jax.random.normal(jax.random.PRNGKey(0), (2, 3, low, low))
  t = torch.tensor(np.asarray(m), dtype=torch.float64)
  want = F.interpolate(t, (frame, frame), mode="bilinear", align_corners=False)
  want = want[:, :, :content[0], :content[1]]
  want = F.interpolate(want, out, mode="bilinear", align_corners=False)
  want = want.numpy().transpose(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda x: postprocess_masks(x, frame, content, out))(m)
  assert got.shape == (2,) + out + (3,)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


def test_fused_image_takes_visible_chroma():
  """fused_color='visible_chroma': the fused image has the decoder's luma (so the fusion loss
  is unchanged) and the RGB input's BT.601 chroma; 'decoder' returns the decoder output."""
  from fusionsam_jax.losses import rgb_to_y
  cfg = tiny_cfg()
  images = {k: jnp.asarray(v[..., :], jnp.float32) / 255.0
            for k, v in _batch(cfg).items() if k != "label"}
  out = {}
  for color in ("decoder", "visible_chroma"):
    model = build_model(tiny_cfg(fused_color=color))
    params = init_params(model, jax.random.PRNGKey(0), (32, 48), image_encoder="abstract")
    params = {k: v for k, v in params.items() if k != "image_encoder"}
    lat = model.apply({"params": params}, images, method=FusionSAM.tokenize)
    if color == "visible_chroma":
      with pytest.raises(ValueError, match="needs the input images"):
        model.apply({"params": params}, lat, method=FusionSAM.fuse)
    out[color] = np.asarray(model.apply({"params": params}, lat, images,
                                        method=FusionSAM.fuse)["fused"], np.float64)
  dec, vis, rgb = out["decoder"], out["visible_chroma"], np.asarray(images["rgb"], np.float64)
  y = lambda x: np.asarray(rgb_to_y(jnp.asarray(x)), np.float64)  # noqa: E731
  np.testing.assert_allclose(y(vis), y(dec), atol=1e-5)
  # Cb ~ B - Y and Cr ~ R - Y (scaled) of the fused image equal those of the RGB input.
  for ch in (0, 2):
    np.testing.assert_allclose(vis[..., ch:ch + 1] - y(vis), rgb[..., ch:ch + 1] - y(rgb),
                               atol=1e-5)
  assert not np.allclose(vis, dec, atol=1e-3)
  # One modality without RGB: nothing to take the colour from, the decoder's output is used.
  th = tiny_cfg(modalities=("thermal",), fused_color="visible_chroma")
  m_th = build_model(th)
  p_th = init_params(m_th, jax.random.PRNGKey(0), (32, 48), image_encoder="abstract")
  lat = m_th.apply({"params": p_th}, {"thermal": images["thermal"]}, method=FusionSAM.tokenize)
  assert m_th.apply({"params": p_th}, lat, method=FusionSAM.fuse)["fused"].shape == (2, 32, 48, 3)


def test_fast_init_matches_flax_init():
  """init_params draws the SAM encoder leaf by leaf (no encoder forward is compiled): same
  tree, shapes and dtypes as Flax's whole-model init, and the same initializer per leaf
  (zeros / ones exactly; kernels with lecun_normal's standard deviation)."""
  cfg = tiny_cfg()
  model = build_model(cfg)
  ours = init_params(model, jax.random.PRNGKey(0), (32, 48))
  from fusionsam_jax.jit_utils import run_once
  flax_init = run_once(lambda r: model.init(r, dummy_images(model, (32, 48)),
                                            method=FusionSAM.init_all)["params"],
                       jax.random.PRNGKey(0))
  assert jax.tree.structure(ours) == jax.tree.structure(flax_init)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), ours) == jax.tree.map(
      lambda x: (x.shape, x.dtype), flax_init)
  # Everything outside the encoder is Flax's own init, value for value (up to float
  # rounding: init is compiled with the optimisation passes turned down).
  for k in flax_init:
    if k != "image_encoder":
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                   ours[k], flax_init[k])
  checked = 0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours["image_encoder"])[0],
                          jax.tree.leaves(flax_init["image_encoder"])):
    a, b = np.asarray(a), np.asarray(b)
    where = jax.tree_util.keystr(path)
    if not b.any():
      assert not a.any(), where
    elif np.all(b == 1):
      assert np.all(a == 1), where
    else:
      assert path[-1].key == "kernel", where
      fan_in = int(np.prod(b.shape[:-1]))
      assert abs(a.std() - fan_in ** -0.5) < 0.15 * fan_in ** -0.5, where
      assert abs(b.std() - fan_in ** -0.5) < 0.15 * fan_in ** -0.5, where
      assert not np.array_equal(a, b)
      checked += 1
  assert checked >= 10
  # "abstract" leaves the encoder as shapes for load_sam_weights to fill.
  abstract = init_params(model, jax.random.PRNGKey(0), (32, 48), image_encoder="abstract")
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(abstract["image_encoder"]))
  jax.tree.map(np.testing.assert_array_equal, abstract["mask_decoder"], ours["mask_decoder"])
  with pytest.raises(ValueError, match="image_encoder must be"):
    init_params(model, jax.random.PRNGKey(0), (32, 48), image_encoder="zeros")


def test_load_sam_weights_into_abstract_encoder(built, tmp_path):
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
  from fusionsam_jax.models.sam.checkpoint import save_sam_checkpoint
  cfg, model, params = built
  sam_params = Sam(SAM_PRESETS["tiny"]).init_params(jax.random.PRNGKey(7))
  save_sam_checkpoint(str(tmp_path / "sam"), SAM_PRESETS["tiny"], sam_params)
  abstract = init_params(model, jax.random.PRNGKey(0), (32, 48), image_encoder="abstract")
  a = load_sam_weights(abstract, str(tmp_path / "sam"), cfg)
  b = load_sam_weights(params, str(tmp_path / "sam"), cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# The single-modality cases are extended: tests/test_ablate.py trains and evaluates an
# RGB-only model through the ablate CLI in the default run.
@pytest.mark.parametrize("over", [
    dict(tokenizer_kind="patch"), dict(fusion="concat"),
    pytest.param(dict(modalities=("rgb",)), marks=pytest.mark.extended),
    pytest.param(dict(modalities=("thermal",)), marks=pytest.mark.extended)])
def test_ablations_and_single_modality_take_a_step(over):
  cfg = tiny_cfg(**over)
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0), (32, 48))
  batch = _batch(cfg)
  names = {s: fn(cfg) for s, fn in STAGE_TRAINABLE.items()}
  if over.get("tokenizer_kind") == "patch":
    assert names["tokenizer"] == () and "patch_embed_rgb" in names["fusion"]
  if len(cfg.modalities) == 1 or over.get("fusion") == "concat":
    assert "concat_fusion" in params and "fmp" not in params
  loss_fn = _seg_loss(model, cfg)
  opt = optax.adam(1e-3)
  value_and_grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, 0)[0]))
  l0, g = value_and_grad(params)
  # Compiled: Adam op by op compiles a kernel per op and leaf shape (~13 s here).
  p1 = jax.jit(lambda p, g: optax.apply_updates(p, opt.update(g, opt.init(p), p)[0]))(params, g)
  assert np.isfinite(float(l0))
  assert np.isfinite(float(value_and_grad(p1)[0]))   # the same program: no second compile


def test_overfits_one_generated_batch():
  """A tiny FusionSAM fits one batch of generated RGB-T scenes: loss / 10, mIoU >= 0.9.

  250 steps: at 150 the fit was still at the threshold (0.87 or 0.9+ depending on float
  rounding order in the optimizer); at 250 it reaches 1.0 either way."""
  from fusionsam_jax.data import generate_elements
  els = generate_elements("mfnet", 2, seed=3, height=64, width=64)
  cfg = tiny_cfg(num_classes=9, freeze_fmp_in_segmentation=True)
  batch = {m: np.stack([e[m] for e in els]) for m in cfg.modalities}
  batch["label"] = np.stack([e["label"] for e in els]).astype(np.int32)
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0), (64, 64))
  loss_fn = _seg_loss(model, cfg)
  names = seg_stage.trainable(cfg)
  opt = C.make_optimizer(3e-3, 0.0)
  # Embeddings don't change (frozen SAM, fused image from the frozen decoder): compute once.
  batch.update(jax.jit(F.cache_fn(model))(params, batch))
  frozen = C.drop(params, names)

  @jax.jit
  def step(p, s):
    (l, _), g = jax.value_and_grad(lambda p: loss_fn(C.merge(frozen, p), batch, None, 0),
                                   has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  trained = C.select(params, names)
  state = opt.init(trained)
  first = None
  for _ in range(250):
    trained, state, loss = step(trained, state)
    first = float(loss) if first is None else first
  params = C.merge(params, trained)
  pred = np.asarray(jax.jit(F.predict_fn(model))(params, batch)["pred"])
  cm = ConfusionMatrix(9)
  cm.update(pred, batch["label"])
  assert float(loss) < first / 10, (first, float(loss))
  assert cm.miou() >= 0.9, cm.iou()


def test_frozen_fusion_dtype(built):
  """`functional.frozen_fusion`: float32 is exactly tokenize -> fuse; bfloat16 (the GPU fast
  path) returns float32, picks the same codes for almost every token (the codebook search
  stays float32; bf16 rounding of the encoder output can still flip near-ties) and, from
  the same codes, computes the fusion to bf16 tolerance."""
  cfg, model, params = built
  images = F.inputs_from_batch(_batch(cfg, b=2, seed=3), cfg.modalities)

  def direct(p, x):
    lat = model.apply({"params": p}, x, method=FusionSAM.tokenize)
    return model.apply({"params": p}, lat, x, method=FusionSAM.fuse)

  with jax.default_matmul_precision("highest"):
    ref = jax.jit(direct)(params, images)
    out32 = jax.jit(lambda p, x: F.frozen_fusion(model, p, x))(params, images)
  for k in ("fusion", "fused"):
    np.testing.assert_array_equal(np.asarray(out32[k]), np.asarray(ref[k]))
  m16 = build_model(tiny_cfg(fusion_dtype="bfloat16"))
  assert m16.fusion_dtype == "bfloat16"
  out16 = jax.jit(lambda p, x: F.frozen_fusion(m16, p, x))(params, images)
  assert all(v.dtype == jnp.float32 for v in out16.values())
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  i16 = {m: x.astype(jnp.bfloat16) for m, x in images.items()}
  for m in cfg.modalities:
    enc = lambda mod, x, m=m: getattr(mod, f"tokenizer_{m}").encode(x)["indices"]
    same = np.mean(np.asarray(model.apply({"params": params}, images[m], method=enc))
                   == np.asarray(m16.apply({"params": p16}, i16[m], method=enc)))
    assert same >= 0.95, (m, same)
  with jax.default_matmul_precision("highest"):
    lat = model.apply({"params": params}, images, method=FusionSAM.tokenize)
  lat16 = {m: x.astype(jnp.bfloat16) for m, x in lat.items()}
  fz16 = m16.apply({"params": p16}, lat16, i16, method=FusionSAM.fuse)
  for k in ("fusion", "fused"):
    a, b = np.asarray(fz16[k], np.float64), np.asarray(ref[k], np.float64)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 3e-2, (k, rel)
