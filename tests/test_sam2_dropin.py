"""`fusionsam_jax.sam2` as a drop-in for `sam2`'s image path: `build_sam2` on an official .pt
(converted in memory), a folder holding one (`from_pretrained`), the official shapes
(`get_image_embedding` NCHW, the `_features` dict), every prompt kind against Meta's
`SAM2ImagePredictor` on the same random tiny weights, and the compile counts (JAX's own
compilation events): none for a new click count, box count or mask input after warm-up, at
most one for a new image size."""

import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
pytest.importorskip("hydra")

import sam2_reference as ref
from fusionsam_jax.models.sam.checkpoint import CheckpointError
from fusionsam_jax.sam2 import SAM2ImagePredictor, build_sam2

TOL = 1e-4
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class CompileCounter:
  """Counts XLA backend compilations as JAX reports them (jax.monitoring)."""

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(official torch model, path of its .pt as released: {"model": state_dict})."""
  tmp = tmp_path_factory.mktemp("sam2_dropin")
  tm = ref.build_torch_sam2("tiny", seed=3)
  pt = tmp / "sam2.1_tiny.pt"
  ref.save_checkpoint(tm, pt)
  return tm, pt


@pytest.fixture(scope="module")
def official_pred(tiny):
  _, ip = ref.official()
  pred = ip.SAM2ImagePredictor(tiny[0])
  s = tiny[0].image_size
  pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
  return pred


@pytest.fixture(scope="module")
def pred(tiny):
  return SAM2ImagePredictor(build_sam2("tiny", str(tiny[1])), compiler_options=FAST)


def test_build_sam2_sources(tiny, tmp_path):
  """The .pt, a folder holding it (from_pretrained) and the torch state dict give the same
  params; a config naming another variant is refused in one line."""
  tm, pt = tiny
  a = build_sam2("tiny", str(pt))
  folder = tmp_path / "hf_download"
  folder.mkdir()
  shutil.copy(pt, folder / "sam2.1_hiera_tiny.pt")
  b = SAM2ImagePredictor.from_pretrained(str(folder)).model
  assert a.config == b.config and a.image_size == tm.image_size
  want = tm.state_dict()["sam_prompt_encoder.point_embeddings.2.weight"].numpy()[0]
  for m in (a, b):
    got = m.params["sam_prompt_encoder"]["point_embeddings_2"]["embedding"][0]
    np.testing.assert_array_equal(got, want)
  assert a.to("cuda") is a and a.eval() is a and str(a.device) == "cpu"
  with pytest.raises(CheckpointError, match=r"sam2\.1_hiera_t\.yaml needs hiera_t weights, "
                                            r"found tiny"):
    build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(pt))
  with pytest.raises(ValueError, match="config_file 'foo.yaml'"):
    build_sam2("foo.yaml")
  (folder / "second.pt").write_bytes(b"")
  with pytest.raises(CheckpointError, match="2 .pt files"):
    SAM2ImagePredictor.from_pretrained(str(folder))


def test_official_shapes_and_prompts(official_pred, pred):
  """Embedding NCHW, `_features` the official dict, and each prompt kind (a (1, 4) box, B
  boxes, clicks with a box, a mask input alone and with clicks) as Meta's predictor."""
  h, w = 150, 200
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
  official_pred.set_image(image)
  with jax.default_matmul_precision("highest"):
    pred.set_image(image)
  want = official_pred._features
  got = pred._features
  assert ref.rel_err(pred.get_image_embedding(), want["image_embed"].numpy()) < TOL
  assert ref.rel_err(got["image_embed"], want["image_embed"].numpy()) < TOL
  assert len(got["high_res_feats"]) == 2
  for g, t in zip(got["high_res_feats"], want["high_res_feats"]):
    assert g.shape == tuple(t.shape) and ref.rel_err(g, t.numpy()) < TOL
  box = np.array([20, 30, 150, 120])
  boxes = np.array([[20, 30, 150, 120], [5, 5, 60, 90], [100, 20, 190, 140]])
  pts, lab = np.array([[60, 70], [120, 40]]), np.array([1, 0])
  with torch.no_grad():
    prev = official_pred.predict(point_coords=pts[:1], point_labels=lab[:1])[2][:1]
  cases = [dict(box=box[None, :], multimask_output=False),
           dict(box=boxes, multimask_output=False),
           dict(point_coords=pts, point_labels=lab, box=box),
           dict(mask_input=prev * 4, multimask_output=False),
           dict(point_coords=pts, point_labels=lab, mask_input=prev, multimask_output=False)]
  with jax.default_matmul_precision("highest"):
    for case in cases:
      with torch.no_grad():
        t = official_pred.predict(**case, return_logits=True)
      g = pred.predict(**case, return_logits=True)
      for a, b in zip(g, t):
        assert a.shape == b.shape, (case, a.shape, b.shape)
        assert ref.rel_err(a, b) < TOL, case


@pytest.mark.parametrize("bad, match", [
    (dict(point_coords=np.zeros(2), point_labels=np.ones(1)), r"point_coords: expected \(N, 2\)"),
    (dict(point_coords=np.zeros((2, 2)), point_labels=np.ones(1)),
     r"point_labels: expected shape \(2,\)"),
    (dict(point_coords=np.zeros((1, 3)), point_labels=np.ones(1)), r"point_coords: expected"),
    (dict(box=np.zeros(3)), r"box: expected \(4,\) or \(B, 4\)"),
    (dict(mask_input=np.zeros((256, 256))), r"mask_input: expected \(1, 64, 64\)"),
])
def test_prompt_errors(pred, bad, match):
  pred.set_image(np.zeros((40, 50, 3), np.uint8))
  with pytest.raises(ValueError, match=match):
    pred.predict(**bad)


def test_compile_counts(pred):
  """After warm-up on one image (set_image and one click): 0 compilations for 1-16 clicks,
  1-16 boxes, a box with up to 16 clicks, a mask input; at most 1 for a new image size."""
  rng = np.random.default_rng(1)
  h, w = 90, 130
  pred.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  pred.predict(point_coords=np.array([[10, 10]]), point_labels=np.array([1]))
  prev = None
  with CompileCounter() as cc:
    for n in range(1, 17):
      pts = rng.uniform(0, 1, (n, 2)) * [w, h]
      lab = rng.integers(0, 2, n)
      boxes = np.sort(rng.uniform(0, 1, (n, 2, 2)) * [w, h], axis=1).reshape(n, 4)
      m, _, low = pred.predict(point_coords=pts, point_labels=lab, mask_input=prev)
      assert m.shape == (3, h, w)
      prev = low[:1] if n % 2 else None
      m, _, _ = pred.predict(box=boxes)
      assert m.shape == ((3, h, w) if n == 1 else (n, 3, h, w))
      pred.predict(point_coords=pts, point_labels=lab, box=boxes[0])
  assert cc.count == 0
  with CompileCounter() as cc:
    pred.set_image(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8))
    for n in (1, 5):
      pred.predict(point_coords=rng.uniform(0, 40, (n, 2)), point_labels=np.ones(n))
      pred.predict(box=np.array([[1, 2, 30, 40]] * n))
  assert cc.count <= 1
