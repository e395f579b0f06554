"""Parity of the Flax SAM 2 with Meta's `sam2` 1.1.0 on the same random weights, saved as a
real .pt (`{"model": state_dict}`, as released) and converted by the CLI. Every tensor of the
official model is redrawn (pos_embed, pos_embed_window, biases, LayerNorm scales included).
float32, highest matmul precision, max relative error <= 1e-5.

tiny: every backbone level (trunk, neck, projected high-res features), prompt embeddings and
decoder outputs for each prompt kind, and the predictor end to end. hiera_t (1024 x 1024):
the predictor end to end (features at every level it keeps, masks, IoU, low-res logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
pytest.importorskip("hydra")

import sam2_reference as ref
from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint, read_sam2_meta
from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS, Sam2, Sam2Features
from fusionsam_jax.models.sam2.predictor import Sam2ImagePredictor

TOL = 1e-5
# Full-size mask logits of the predictor (hiera_t: 1.9e-5 where its low-res logits agree
# within 1e-5): resized by interpolation matrices here and by F.interpolate there.
MASK_TOL = 1e-4
# Unoptimised XLA CPU code: about half the compile time, same float32 arithmetic.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _converted(name, tmp_path_factory):
  tmp = tmp_path_factory.mktemp(f"sam2_{name}".replace("+", "p"))
  tm = ref.build_torch_sam2(name, seed=1)
  pt = tmp / f"sam2.1_{name}.pt"
  ref.save_checkpoint(tm, pt)
  res = ref.run_converter(pt, tmp / "ckpt")
  assert res.returncode == 0, res.stderr
  cfg, params = load_sam2_checkpoint(str(tmp / "ckpt"))
  assert cfg == SAM2_PRESETS[name]
  assert read_sam2_meta(str(tmp / "ckpt"))["variant"] == name
  return tm, cfg, params, tmp / "ckpt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _converted("tiny", tmp_path_factory)


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(x))


def test_every_official_tensor_is_random(tiny):
  """No tensor left at a constant init (zero pos_embed / biases, unit LayerNorm scales)."""
  ref.assert_every_tensor_random(tiny[0])


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def test_backbone_levels(tiny):
  tm, cfg, params, _ = tiny
  s = cfg.image_size
  x = np.random.default_rng(0).normal(size=(2, 3, s, s)).astype(np.float32)
  with torch.no_grad():
    t_trunk = tm.image_encoder.trunk(_t(x))
    t_fpn = tm.image_encoder(_t(x))["backbone_fpn"]
    t_proj = tm.forward_image(_t(x))["backbone_fpn"]
  model = Sam2(cfg)

  fused = Sam2(cfg, attn_impl="fused")  # jax.nn.dot_product_attention, as cuDNN on GPU

  def run(m, x):
    return m.image_encoder.trunk(x), m.backbone(x), m.encode(x)

  def run_both(p, x):
    return (model.apply({"params": p}, x, method=run),
            fused.apply({"params": p}, x, method=Sam2.backbone))

  with jax.default_matmul_precision("highest"):
    (trunk, fpn, feats), fpn_fused = jax.jit(run_both, compiler_options=FAST)(
        params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(trunk) == 4 and len(fpn) == 3
  pairs = list(zip(trunk, t_trunk)) + list(zip(fpn, t_fpn)) + list(zip(fpn_fused, t_fpn))
  for got, want in pairs:
    assert got.shape == _nhwc(want).shape
    assert ref.rel_err(got, _nhwc(want)) < TOL
  s0, s1 = feats.high_res_feats
  assert ref.rel_err(s0, _nhwc(t_proj[0])) < TOL
  assert ref.rel_err(s1, _nhwc(t_proj[1])) < TOL
  want_embed = _nhwc(t_proj[2]) + tm.no_mem_embed.detach().numpy()[0]
  assert ref.rel_err(feats.image_embed, want_embed) < TOL


def _prompts(cfg, rng, b=2):
  s, e = cfg.image_size, cfg.image_embedding_size
  coords = rng.uniform(0, s, (b, 4, 2)).astype(np.float32)
  labels = np.array([[2, 3, 1, 0], [1, 1, 0, -1]], np.int32)[:b]
  boxes = np.sort(rng.uniform(0, s, (b, 2, 2)), axis=1).reshape(b, 4).astype(np.float32)
  masks = rng.normal(0, 3, (b, 1, 4 * e, 4 * e)).astype(np.float32)
  return coords, labels, boxes, masks


@pytest.mark.parametrize("kind", ["points", "boxes", "masks", "all"])
def test_prompt_embeddings_and_decoder(tiny, kind):
  """Labels include 2 / 3 (box corners as points) and -1; "all" combines points, a box and a
  mask; both multimask settings (single-mask output goes through the stability fallback)."""
  tm, cfg, params, _ = tiny
  rng = np.random.default_rng(1)
  coords, labels, boxes, masks = _prompts(cfg, rng)
  use_pts = kind in ("points", "all")
  use_box = kind in ("boxes", "all")
  use_msk = kind in ("masks", "all")
  e, d = cfg.image_embedding_size, cfg.d_model
  embed = rng.normal(size=(1, d, e, e)).astype(np.float32)
  s0 = rng.normal(size=(1, d // 8, 4 * e, 4 * e)).astype(np.float32)
  s1 = rng.normal(size=(1, d // 4, 2 * e, 2 * e)).astype(np.float32)
  pe, dec = tm.sam_prompt_encoder, tm.sam_mask_decoder
  with torch.no_grad():
    t_sparse, t_dense = pe((_t(coords), _t(labels)) if use_pts else None,
                           _t(boxes) if use_box else None, _t(masks) if use_msk else None)
    want = {m: dec(_t(embed), pe.get_dense_pe(), t_sparse, t_dense, multimask_output=m,
                   repeat_image=True, high_res_features=[_t(s0), _t(s1)])
            for m in (True, False)}
  kw = dict(point_coords=jnp.asarray(coords) if use_pts else None,
            point_labels=jnp.asarray(labels) if use_pts else None,
            boxes=jnp.asarray(boxes) if use_box else None,
            mask_inputs=jnp.asarray(masks.transpose(0, 2, 3, 1)) if use_msk else None)
  feats = Sam2Features(jnp.asarray(embed.transpose(0, 2, 3, 1)),
                       (jnp.asarray(s0.transpose(0, 2, 3, 1)),
                        jnp.asarray(s1.transpose(0, 2, 3, 1))))

  def run(m, f):
    return (m.prompt_embeddings(**kw), m.dense_pe(),
            {multi: m.decode(f, **kw, multimask_output=multi) for multi in (True, False)})

  with jax.default_matmul_precision("highest"):
    (sparse, dense), dense_pe, got = jax.jit(
        lambda p, f: Sam2(cfg).apply({"params": p}, f, method=run), compiler_options=FAST)(
            params, feats)
  assert ref.rel_err(dense_pe, _nhwc(pe.get_dense_pe())) < TOL
  assert sparse.shape == tuple(t_sparse.shape)
  if sparse.shape[1]:
    assert ref.rel_err(sparse, t_sparse.numpy()) < TOL
  assert ref.rel_err(dense, _nhwc(t_dense)) < TOL
  for multi in (True, False):
    low, iou, obj = got[multi]
    t_low, t_iou, _, t_obj = want[multi]
    assert low.shape == tuple(t_low.shape) and iou.shape == tuple(t_iou.shape)
    assert ref.rel_err(low, t_low.numpy()) < TOL
    assert ref.rel_err(iou, t_iou.numpy()) < TOL
    assert ref.rel_err(obj, t_obj.numpy()) < TOL


def _official_predictor(tm, cfg):
  _, ip = ref.official()
  pred = ip.SAM2ImagePredictor(tm)
  s = cfg.image_size
  pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
  return pred


@pytest.fixture(scope="module")
def tiny_predictors(tiny):
  tm, cfg, _, ckpt = tiny
  return (_official_predictor(tm, cfg),
          Sam2ImagePredictor.from_checkpoint(str(ckpt), compiler_options=FAST))


def _check_predictor(t_pred, pred, h, w, full=True):
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  t_pred.set_image(image)
  with jax.default_matmul_precision("highest"):
    pred.set_image(image)
  t_feats = t_pred._features
  assert ref.rel_err(pred.get_image_embedding(), _nhwc(t_feats["image_embed"])) < TOL
  for got, want in zip(pred.features.high_res_feats, t_feats["high_res_feats"]):
    assert ref.rel_err(got, _nhwc(want)) < TOL
  pts = np.array([[w * 0.3, h * 0.6], [w * 0.7, h * 0.2], [w * 0.5, h * 0.5]])
  lab = np.array([1, 0, 1])
  box = np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])
  cases = [(dict(point_coords=pts[:1], point_labels=lab[:1]), True),
           (dict(point_coords=pts, point_labels=lab), False),  # 3 clicks: padded to 4, masked
           (dict(box=box), True),
           (dict(point_coords=pts[:2], point_labels=lab[:2], box=box), False)]
  if not full:  # the decoder at full size, once: a combined prompt
    cases = cases[-1:]
  with jax.default_matmul_precision("highest"):
    for case, multi in cases:
      tm_, ti, tl = t_pred.predict(**case, multimask_output=multi, return_logits=True)
      m, i, l = pred.predict(**case, multimask_output=multi, return_logits=True)
      assert m.shape == tm_.shape and i.shape == ti.shape and l.shape == tl.shape
      assert ref.rel_err(l, tl) < TOL
      assert ref.rel_err(m, tm_) < MASK_TOL
      assert ref.rel_err(i, ti) < TOL
    if not full:
      return
    # A mask prompt from the previous logits (scaled to real SAM 2 logit sizes), thresholded.
    prev = tl[:1] * (10.0 / np.abs(tl).max())
    kw = dict(point_coords=pts[:2], point_labels=lab[:2], mask_input=prev,
              multimask_output=False)
    tlog, ti, tl = t_pred.predict(**kw, return_logits=True)
    tm_, _, _ = t_pred.predict(**kw)
    m, i, l = pred.predict(**kw)
    assert m.dtype == tm_.dtype == np.float32 and m.shape == tm_.shape
    assert ref.rel_err(l, tl) < TOL and ref.rel_err(i, ti) < TOL
    disagree = m != tm_
    assert np.all(np.abs(tlog[disagree]) < 1e-3 * np.abs(tlog).max())


def test_predictor_matches_official_tiny(tiny, tiny_predictors):
  _, cfg, _, _ = tiny
  _check_predictor(*tiny_predictors, 3 * cfg.image_size // 4, cfg.image_size + 40)


def test_predictor_batch_and_several_boxes(tiny_predictors):
  t_pred, pred = tiny_predictors
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8),
            rng.integers(0, 256, (300, 170, 3), dtype=np.uint8)]
  t_pred.set_image_batch(images)
  with jax.default_matmul_precision("highest"):
    pred.set_image_batch(images)
    pts = [np.array([[50.0, 60.0], [120.0, 30.0]]), np.array([[80.0, 200.0], [20.0, 20.0]])]
    labs = [np.array([1, 0]), np.array([1, 1])]
    boxes = [np.array([[10.0, 20.0, 150.0, 140.0], [30.0, 5.0, 90.0, 100.0]]),
             np.array([[20.0, 40.0, 160.0, 280.0], [0.0, 0.0, 100.0, 100.0]])]
    want = t_pred.predict_batch(pts, labs, multimask_output=True, return_logits=True)
    got = pred.predict_batch(pts, labs, multimask_output=True, return_logits=True)
    for g_list, w_list in zip(got, want):
      for g, w in zip(g_list, w_list):
        assert g.shape == w.shape and ref.rel_err(g, w) < TOL
    want = t_pred.predict_batch(None, None, boxes, multimask_output=False, return_logits=True)
    got = pred.predict_batch(None, None, boxes, multimask_output=False, return_logits=True)
    for g_list, w_list in zip(got, want):
      for g, w in zip(g_list, w_list):
        assert g.shape == w.shape and ref.rel_err(g, w) < TOL
  assert got[0][1].shape == (2, 1, 300, 170)  # two boxes on image 1: (B, C, H, W)
  with pytest.raises(RuntimeError, match="set_image_batch"):
    pred.set_image(images[0])
    pred.predict_batch(pts, labs)


def test_new_point_counts_do_not_recompile(tiny_predictors):
  _, pred = tiny_predictors
  pred.set_image(np.zeros((64, 80, 3), np.uint8))
  rng = np.random.default_rng(4)
  pred.predict(point_coords=rng.uniform(0, 60, (5, 2)), point_labels=np.ones(5))
  before = pred._decode._cache_size()
  for n in (6, 7, 8):  # same bucket as 5: 8 points
    pred.predict(point_coords=rng.uniform(0, 60, (n, 2)), point_labels=np.ones(n))
  assert pred._decode._cache_size() == before


@pytest.mark.extended
def test_hiera_t_predictor_matches_official(tmp_path_factory):
  """hiera_t at 1024 x 1024 from a 480 x 640 image: the three feature levels the predictor
  keeps, then points + box through the full-size decoder."""
  tm, cfg, _, ckpt = _converted("hiera_t", tmp_path_factory)
  _check_predictor(_official_predictor(tm, cfg),
                   Sam2ImagePredictor.from_checkpoint(str(ckpt), compiler_options=FAST),
                   480, 640, full=False)


def test_auto_attention_sends_only_long_sequences_to_cudnn(monkeypatch):
  """attn_impl="auto" on a GPU: cuDNN for >= AUTO_CUDNN_MIN_KEYS keys, XLA's einsum path
  below (checked against a plain softmax(q k^T / sqrt(d)) v in numpy); off the GPU always
  XLA. The GPU backend and the cuDNN call are stood in for (this runs on CPU)."""
  from fusionsam_jax.models.sam2 import hiera
  calls = []

  def fake_dpa(q, k, v, implementation=None, **kw):
    calls.append((k.shape[1], implementation))
    return jnp.zeros_like(q)

  rng = np.random.default_rng(0)

  def qkv(n):
    return [jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for _ in range(3)]

  def reference(q, k, v):
    s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnqk,bknd->bqnd", p / p.sum(-1, keepdims=True), v)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_dpa)
  short, long = qkv(hiera.AUTO_CUDNN_MIN_KEYS - 1), qkv(hiera.AUTO_CUDNN_MIN_KEYS)
  np.testing.assert_allclose(hiera._attention(*short, "auto"), reference(*short), rtol=1e-5,
                             atol=1e-6)                  # CPU: XLA even for long ones
  np.testing.assert_allclose(hiera._attention(*long, "auto"), reference(*long), rtol=1e-5,
                             atol=1e-6)
  assert calls == []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  np.testing.assert_allclose(hiera._attention(*short, "auto"), reference(*short), rtol=1e-5,
                             atol=1e-6)
  assert calls == []
  hiera._attention(*long, "auto")
  assert calls == [(hiera.AUTO_CUDNN_MIN_KEYS, "cudnn")]
