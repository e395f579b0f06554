"""`SamPredictor`: no recompilation across point counts, box counts and image sizes, and the
same outputs as the official `segment_anything.SamPredictor` on the same random weights."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusionsam_jax.models.sam.predictor import LoadedSam, SamPredictor
from fusionsam_jax.models.sam.sam import SAM_PRESETS
from fusionsam_jax.models.sam.checkpoint import convert_state_dict
import sam_reference as ref

TOL = 1e-4
CFG = SAM_PRESETS["tiny"]


@pytest.fixture(scope="module")
def models():
  tsam = ref.build_torch_sam(CFG, seed=5)
  sd = {k: v.numpy() for k, v in tsam.state_dict().items()}
  cfg, params = convert_state_dict(sd)
  assert cfg == CFG
  return tsam, LoadedSam(cfg, params)


@pytest.fixture(scope="module")
def pred(models):
  """One predictor for the parity tests (its compiled programs are shared between them)."""
  return SamPredictor(models[1])


class CompileCounter:
  """Counts XLA backend compilations as JAX itself reports them (jax.monitoring)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def _listener(self, event, duration, **kwargs):
    if event == self.EVENT:
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_compile_counts(models):
  """20 calls, 1-9 points, 1-4 boxes, three image sizes in three output-size buckets:
  at most 2 compilations per image size (the encoder once, one decode program per size
  bucket), none for a new number of points or boxes."""
  _, sam = models
  pred = SamPredictor(sam)
  rng = np.random.default_rng(0)
  sizes = [(90, 120), (300, 200), (600, 700)]
  calls = [("points", 1), ("points", 4), ("boxes", 1), ("points", 9), ("boxes", 3),
           ("both", 2), ("boxes", 4)]
  per_size, after_first, n_calls = [], [], 0
  with CompileCounter() as cc:
    for si, (h, w) in enumerate(sizes):
      start = cc.count
      pred.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      for ci, (kind, n) in enumerate(calls[:7 if si < 2 else 6]):
        before = cc.count
        pts = rng.uniform(0, 1, (n, 2)) * [w, h]
        lab = rng.integers(0, 2, n)
        boxes = np.sort(rng.uniform(0, 1, (n, 2, 2)) * [w, h], axis=1).reshape(n, 4)
        if kind == "points":
          m, i, l = pred.predict(point_coords=pts, point_labels=lab)
          assert m.shape == (3, h, w) and i.shape == (3,) and l.shape == (3, 64, 64)  # tiny: 4 x 16
        elif kind == "boxes":
          m, i, l = pred.predict(box=boxes)  # a (1, 4) box is one box, as in the official
          assert m.shape == ((3, h, w) if n == 1 else (n, 3, h, w))
          assert i.shape == ((3,) if n == 1 else (n, 3))
        else:
          m, i, l = pred.predict(point_coords=pts, point_labels=lab, box=boxes)
          assert m.shape == ((3, h, w) if n == 1 else (n, 3, h, w))
        n_calls += 1
        if ci > 0:
          after_first.append(cc.count - before)
      per_size.append(cc.count - start)
  assert n_calls == 20
  print("compilations per image size:", per_size)
  assert all(c <= 2 for c in per_size), per_size
  assert sum(after_first) == 0, after_first


def _official(tsam):
  _, predictor_mod = ref.official()
  return predictor_mod.SamPredictor(tsam)


def _t(x):
  return torch.as_tensor(np.asarray(x))


def test_matches_official_batched(models, pred):
  """Padded points, several boxes per call, an image larger than the model's canvas."""
  tsam, _ = models
  h, w = 300, 420
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  tp = _official(tsam)
  with torch.no_grad():
    tp.set_image(image)
  with jax.default_matmul_precision("highest"):
    pred.set_image(image)
    assert ref.rel_err(pred.get_image_embedding(), tp.get_image_embedding().numpy()) < TOL
    pts = rng.uniform(0, 1, (5, 2)) * [w, h]
    lab = np.array([1, 0, 1, 1, 0])
    boxes = np.sort(rng.uniform(0, 1, (3, 2, 2)) * [w, h], axis=1).reshape(3, 4)
    for n_pts in (1, 5):  # one bucket: both padded to 16 slots
      for multi in (True, False):
        m, i, l = pred.predict(point_coords=pts[:n_pts], point_labels=lab[:n_pts],
                               multimask_output=multi, return_logits=True)
        with torch.no_grad():
          tm, ti, tl = tp.predict(point_coords=pts[:n_pts], point_labels=lab[:n_pts],
                                  multimask_output=multi, return_logits=True)
        assert m.shape == tm.shape and l.shape == tl.shape
        for a, b in ((m, tm), (i, ti), (l, tl)):
          assert ref.rel_err(a, b) < TOL
    # Three boxes with the same two points, in one call (the official predict_torch).
    tb = tp.transform.apply_boxes(boxes, (h, w))
    tc = np.repeat(tp.transform.apply_coords(pts[:2], (h, w))[None], 3, 0)
    m, i, l = pred.predict(point_coords=pts[:2], point_labels=lab[:2], box=boxes,
                           return_logits=True)
    with torch.no_grad():
      tm, ti, tl = tp.predict_torch(_t(tc).float(), _t(np.repeat(lab[None, :2], 3, 0)),
                                    _t(tb).float(), multimask_output=True, return_logits=True)
    assert m.shape == tuple(tm.shape) == (3, 3, h, w)
    for a, b in ((m, tm), (i, ti), (l, tl)):
      assert ref.rel_err(a, b.numpy()) < TOL
    # Boxes only, boolean masks: may differ only where the logit is at float noise of 0.
    m, i, _ = pred.predict(box=boxes, multimask_output=False)
    with torch.no_grad():
      tm, _, _ = tp.predict_torch(None, None, _t(tb).float(), multimask_output=False,
                                  return_logits=True)
    tm = tm.numpy()
    assert m.dtype == np.bool_ and m.shape == tm.shape
    assert np.all(np.abs(tm[m != (tm > 0)]) < 1e-4 * np.abs(tm).max())


def test_image_batch_and_torch_image(models, pred):
  """set_image on a batch of differently sized images, and set_torch_image."""
  tsam, _ = models
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(64, 100), (150, 90),
                                                                     (256, 256)]]
  with jax.default_matmul_precision("highest"):
    pred.set_image(images)
    assert pred.get_image_embedding().shape == (3, 64, 16, 16)
    pred.embedding_layout = "NHWC"
    assert pred.get_image_embedding().shape == (3, 16, 16, 64)
    pred.embedding_layout = "NCHW"
    embeddings = np.asarray(pred.get_image_embedding())
    for k, image in enumerate(images):
      h, w = image.shape[:2]
      tp = _official(tsam)
      with torch.no_grad():
        tp.set_image(image)
      assert ref.rel_err(embeddings[k:k + 1], tp.get_image_embedding().numpy()) < TOL
      box = np.array([w * 0.2, h * 0.1, w * 0.9, h * 0.7])
      pred.set_image(images)  # (set_torch_image below replaces the batch)
      m, i, l = pred.predict(box=box, image_index=k, return_logits=True)
      with torch.no_grad():
        tm, ti, tl = tp.predict(box=box, return_logits=True)
      assert m.shape == tm.shape == (3, h, w)
      for a, b in ((m, tm), (i, ti), (l, tl)):
        assert ref.rel_err(a, b) < TOL
      # set_torch_image with the official transform's output.
      resized = tp.transform.apply_image(image)
      pred.set_torch_image(torch.as_tensor(resized).permute(2, 0, 1)[None].numpy(), (h, w))
      m2, _, _ = pred.predict(box=box, return_logits=True)
      assert ref.rel_err(m2, tm) < TOL
    pred.set_image(images)
  with pytest.raises(IndexError):
    pred.predict(box=box, image_index=3)
