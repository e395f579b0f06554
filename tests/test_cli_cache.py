"""Embedding cache: miss -> build, hit, rebuild when an upstream param changes, not when a
segmentation-stage param changes; cached embeddings equal a fresh `embed_fn`; views."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cli_helpers import tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from fusionsam_jax import data
  from fusionsam_jax import training as T
  from fusionsam_jax.models import factory
  cfg = tiny_config(tmp_path_factory.mktemp("cache_data"))
  cfg.train.embedding_cache.num_views = 3
  els = data.generate_elements("mfnet", 12, seed=3, height=96, width=128)
  train_src = data.InMemorySource(els[:6])
  val_src = data.InMemorySource(els[6:9])
  model = factory.build_model(cfg)
  params = factory.init_params(cfg, model)
  return cfg, model, params, train_src, val_src, T.make_mesh()


def _build(setup, workdir, params):
  from fusionsam_jax.stages import embedding_cache as EC
  cfg, model, _, train_src, val_src, mesh = setup
  msgs = []
  cache = EC.build_for_sources(cfg, str(workdir), model, params, mesh, train_src, val_src,
                               progress=False, say=msgs.append)
  return cache, msgs


def test_cache_hit_miss_rebuild(setup, tmp_path):
  from fusionsam_jax.stages import embedding_cache as EC
  from fusionsam_jax.models import functional as F
  from fusionsam_jax.stages import segmentation as S
  cfg, model, params, train_src, val_src, mesh = setup
  c1, msgs = _build(setup, tmp_path, params)
  assert not c1.hit and any("building" in m for m in msgs)
  src = c1.train_source()
  assert len(src) == 6 * 3
  # The stored embeddings are embed_fn of the stored views.
  el = src[4]
  images = {m: el[m][None] for m in cfg.model.modalities}
  want = jax.jit(lambda p, b: F.image_embeddings(model, p, F.frozen_fusion(
      model, p, F.inputs_from_batch(b, model.modalities))["fused"]))(params, images)
  np.testing.assert_allclose(el["image_embeddings"], np.asarray(want)[0], rtol=1e-5, atol=1e-5)
  got = jax.jit(F.cache_fn(model))(params, images)
  np.testing.assert_allclose(el["fusion"], np.asarray(got["fusion"])[0], rtol=1e-5, atol=1e-5)
  # The segmentation loss on the cached (embeddings, fusion) equals the loss computed from
  # the view's images.
  loss_fn = S.loss_fn(model, cfg.model, cfg.train.stages.segmentation,
                      cfg.train.stages.fusion)
  views = [src[i] for i in range(4)]
  full = {k: np.stack([v[k] for v in views]) for k in tuple(cfg.model.modalities) + ("label",)}
  cached = dict(full, **{k: np.stack([v[k] for v in views]) for k in ("image_embeddings",
                                                                       "fusion")})
  with jax.default_matmul_precision("highest"):
    l_full = jax.jit(lambda p, b: loss_fn(p, b, None, 0)[0])(params, full)
    l_cached = jax.jit(lambda p, b: loss_fn(p, b, None, 0)[0])(params, cached)
  np.testing.assert_allclose(float(l_cached), float(l_full), rtol=1e-5)
  assert el["label"].dtype == np.int32 and el["rgb"].shape == (96, 128, 3)
  batches = list(c1.val_batches())
  assert batches and "image_embeddings" in batches[0] and "valid" in batches[0]

  c2, msgs = _build(setup, tmp_path, params)
  assert c2.hit and c2.train_dir == c1.train_dir and any("reusing" in m for m in msgs)

  # A param the segmentation stage trains does not invalidate the cache ...
  seg_name = "mask_decoder"
  assert seg_name in S.trainable(cfg.model)
  p2 = dict(params)
  p2[seg_name] = jax.tree.map(lambda x: x + 1.0, params[seg_name])
  assert _build(setup, tmp_path, p2)[0].hit
  # ... an upstream (fusion / tokenizer) param does: rebuild, old folder removed.
  up = [k for k in EC.embed_param_names(cfg.model) if k != "image_encoder"][0]
  p3 = dict(params)
  p3[up] = jax.tree.map(lambda x: x * 1.5 + 0.01, params[up])
  c3, msgs = _build(setup, tmp_path, p3)
  assert not c3.hit and c3.train_dir != c1.train_dir
  assert any("rebuilding" in m for m in msgs)
  assert not os.path.exists(c1.train_dir) and os.path.exists(c3.train_dir)
  leftovers = [d for d in os.listdir(tmp_path / "embedding_cache") if d.startswith(".")]
  assert leftovers == []
  # Issue 37 item 2: a deleted val batch file silently shrank the val set (val mIoU on 2 of
  # 4 images). The damaged folder is now rebuilt whole, and holds every batch again.
  n_val = len(list(c3.val_batches()))
  val_dir = c3.val_dir
  last = sorted(f for f in os.listdir(val_dir) if f.startswith("batch_"))[-1]
  os.remove(os.path.join(val_dir, last))
  c4, msgs = _build(setup, tmp_path, p3)
  assert any("damaged" in m and "batch files" in m for m in msgs), msgs
  assert len(list(c4.val_batches())) == n_val


def test_cache_off_when_fmp_trains(setup, tmp_path):
  from fusionsam_jax.stages import embedding_cache as EC
  cfg = setup[0].copy_and_resolve_references()
  cfg.model.freeze_fmp_in_segmentation = False
  ok, why = EC.cache_enabled(cfg)
  assert not ok and "freeze_fmp_in_segmentation" in why
  cfg.model.freeze_fmp_in_segmentation = True
  cfg.train.embedding_cache.enabled = False
  assert not EC.cache_enabled(cfg)[0]


def test_views_are_deterministic():
  from fusionsam_jax import data
  from fusionsam_jax.stages.embedding_cache import make_view
  el = data.generate_elements("mfnet", 1, seed=0, height=96, width=128)[0]
  kw = dict(index=0, crop_size=(64, 96), scale_range=(0.5, 2.0), seed=0,
            modalities=("rgb", "thermal"))
  v0, v1 = make_view(el, 0, **kw), make_view(el, 1, **kw)
  np.testing.assert_array_equal(v0["rgb"], el["rgb"][16:80, 16:112])
  np.testing.assert_array_equal(v1["rgb"], v0["rgb"][:, ::-1])
  a, b = make_view(el, 2, **kw), make_view(el, 2, **kw)
  np.testing.assert_array_equal(a["thermal"], b["thermal"])
  assert a["rgb"].shape == (64, 96, 3) and a["label"].shape == (64, 96)
