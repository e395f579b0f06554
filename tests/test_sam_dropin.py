"""`fusionsam_jax.sam` as a drop-in for `segment_anything`: the same top-level names, the
torch glue the notebooks use (`to`, `device`, `image_encoder.img_size`, the `*_torch`
transforms on numpy / JAX / torch arrays against the official ones) and prompts validated
like the official predictor or better (one-line errors naming the argument and the expected
shape), on the tiny model."""

import ast
import importlib.machinery
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sam_reference as ref
import fusionsam_jax.sam as fsam
import fusionsam_jax.sam2 as fsam2
from fusionsam_jax.models.sam.sam import SAM_PRESETS, LoadedSam, Sam


def _exported(pkg, module=None):
  """Names a module of an installed package defines or imports at its top level (read with
  ast: importing segment_anything needs torchvision)."""
  # The path finder, not find_spec: another test module may have put a stand-in package
  # (no __spec__) into sys.modules under this name.
  spec = importlib.machinery.PathFinder.find_spec(pkg)
  path = os.path.join(os.path.dirname(spec.origin), (module or "__init__") + ".py")
  tree = ast.parse(open(path).read())
  names = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("."):
      names.update(a.asname or a.name for a in node.names)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
      names.add(node.name)
  return names


def test_namespaces_export_the_official_names():
  assert _exported("segment_anything") <= set(fsam.__all__)
  assert {"build_sam2", "build_sam2_hf"} <= set(fsam2.__all__)
  assert "SAM2ImagePredictor" in _exported("sam2", "sam2_image_predictor")
  for name in fsam.__all__:
    assert getattr(fsam, name) is not None
  for name in fsam2.__all__:
    assert getattr(fsam2, name) is not None


@pytest.fixture(scope="module")
def sam():
  cfg = SAM_PRESETS["tiny"]
  return LoadedSam(cfg, Sam(cfg).init_params(jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def predictor(sam):
  p = fsam.SamPredictor(sam)
  p.set_image(np.zeros((60, 80, 3), np.uint8))
  return p


def test_torch_glue(sam, predictor):
  assert sam.to(device="cuda") is sam and sam.eval() is sam
  assert sam.image_encoder.img_size == 256
  assert predictor.model is sam
  t = torch.zeros(2, device=predictor.device)   # the notebooks' torch.tensor(..., device=)
  assert t.device.type == "cpu"
  assert "JaxDevice" in repr(predictor.device) and str(sam.device) == "cpu"


def test_transforms_torch_match_official(predictor):
  _, official_predictor = ref.official()
  from segment_anything.utils.transforms import ResizeLongestSide as Official
  want_t = Official(256)
  boxes = np.array([[75, 275, 1725, 850], [425, 600, 700, 875]], np.float32)
  coords = np.array([[[500, 375], [1125, 625]]], np.float32)
  wb = want_t.apply_boxes_torch(torch.from_numpy(boxes), (1200, 1800)).numpy()
  wc = want_t.apply_coords_torch(torch.from_numpy(coords), (1200, 1800)).numpy()
  tr = predictor.transform
  for kind in (np.asarray, torch.from_numpy, jnp.asarray):
    gb = tr.apply_boxes_torch(kind(boxes), (1200, 1800))
    gc = tr.apply_coords_torch(kind(coords), (1200, 1800))
    assert isinstance(gb, torch.Tensor) == (kind is torch.from_numpy)
    np.testing.assert_allclose(np.asarray(gb), wb, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gc), wc, rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(point_coords=np.array([10, 20]), point_labels=np.array([1])),
     r"^point_coords: expected \(N, 2\) xy, got shape \(2,\)$"),
    (dict(point_coords=np.zeros((2, 2)), point_labels=np.array([1])),
     r"^point_labels: expected shape \(2,\) \(one label per point\), got \(1,\)$"),
    (dict(point_coords=np.zeros((1, 3)), point_labels=np.array([1])),
     r"^point_coords: expected \(N, 2\) xy, got shape \(1, 3\)$"),
    (dict(point_coords=np.zeros((1, 2))), r"^point_labels must be supplied"),
    (dict(box=np.zeros(3)), r"^box: expected \(4,\) or \(1, 4\) xyxy"),
    (dict(mask_input=np.zeros((256, 256))),
     r"^mask_input: expected \(1, 64, 64\) low-res logits, got shape \(256, 256\)$"),
    (dict(mask_input=np.zeros((1, 256, 256))), r"^mask_input: expected \(1, 64, 64\)"),
])
def test_prompt_errors(predictor, bad, match):
  with pytest.raises(ValueError, match=match):
    predictor.predict(**bad)


def test_predict_torch_errors(predictor):
  with pytest.raises(ValueError, match=r"^point_coords: expected \(B, N, 2\) xy"):
    predictor.predict_torch(np.zeros((3, 2)), np.ones((3,)))
  with pytest.raises(ValueError, match=r"^point_labels: expected shape \(1, 3\)"):
    predictor.predict_torch(np.zeros((1, 3, 2)), np.ones((1, 2)))
  with pytest.raises(ValueError, match=r"^boxes: expected \(B, 4\)"):
    predictor.predict_torch(boxes=np.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"^mask_input: expected \(B, 1, 64, 64\)"):
    predictor.predict_torch(boxes=np.zeros((1, 4)), mask_input=np.zeros((1, 64, 64)))
  with pytest.raises(ValueError, match=r"do not broadcast"):
    predictor.predict_torch(boxes=np.zeros((2, 4)), mask_input=np.zeros((3, 1, 64, 64)))


def test_box_shapes(predictor):
  """(4,) and (1, 4): one box, (C, H, W) as the official; (B, 4), B > 1: B boxes."""
  for box in (np.array([5, 5, 50, 40]), np.array([[5, 5, 50, 40]])):
    m, i, l = predictor.predict(box=box)
    assert m.shape == (3, 60, 80) and i.shape == (3,) and l.shape == (3, 64, 64)
  m, i, l = predictor.predict(box=np.array([[5, 5, 50, 40], [0, 0, 20, 20]]))
  assert m.shape == (2, 3, 60, 80) and i.shape == (2, 3)
