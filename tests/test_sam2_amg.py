"""`SAM2AutomaticMaskGenerator` against sam2's generator on the same random tiny SAM 2 and
image: the same records in the same order (boxes, areas, points, crop boxes; predicted IoU
and stability score to 1e-4; masks matching but for pixels at float noise of the threshold).

Random weights give masks of scattered noise; so that masks follow image regions, the test
model has a larger hypernetwork output (logits of a trained model's size) and 2x2
transposed-conv kernels equal at all four taps. The image is a few flat discs.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
pytest.importorskip("hydra")

import sam_reference as ref
import sam2_reference as ref2
from fusionsam_jax.models.sam.amg import coco_encode_rle, mask_to_rle
from fusionsam_jax.sam2 import SAM2AutomaticMaskGenerator, build_sam2

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Thresholds for this random model (predicted IoUs ~0.5): 2 masks of 192 survive NMS.
KW = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0,
          stability_score_thresh=0.5, stability_score_offset=0.3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tm = ref2.build_torch_sam2("tiny", seed=7)
  with torch.no_grad():
    for n, p in tm.named_parameters():
      if "output_hypernetworks_mlps" in n and "layers.2" in n:
        p.mul_(30.0)
      if n.startswith("sam_mask_decoder.output_upscaling.") and p.ndim == 4:
        p.copy_(p[:, :, :1, :1].expand_as(p))
  pt = tmp_path_factory.mktemp("sam2_amg") / "sam2_tiny.pt"
  ref2.save_checkpoint(tm, pt)
  return tm, pt


@pytest.fixture(scope="module")
def image():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:180, :240]
  img = np.zeros((180, 240, 3), np.uint8)
  for _ in range(6):
    cy, cx, r = rng.uniform(0, 180), rng.uniform(0, 240), rng.uniform(15, 60)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
  return img


def _official_generator(tm, **kw):
  ref2.official()
  ref._install_stub_torchvision_ops()
  import sam2.automatic_mask_generator as amg
  s = tm.image_size
  gen = amg.SAM2AutomaticMaskGenerator(tm, **kw)
  gen.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
  return gen


def test_records_match_official(tiny, image):
  tm, pt = tiny
  with torch.no_grad():
    want = _official_generator(tm, **KW).generate(image)
  gen = SAM2AutomaticMaskGenerator(build_sam2("tiny", str(pt)), compiler_options=FAST, **KW)
  got = gen.generate(image)
  assert len(got) == len(want) >= 2
  for w, g in zip(want, got):
    assert sorted(g) == sorted(w)
    assert g["bbox"] == w["bbox"] and g["crop_box"] == w["crop_box"]
    np.testing.assert_allclose(g["point_coords"], w["point_coords"], rtol=1e-6)
    assert abs(g["predicted_iou"] - w["predicted_iou"]) < 1e-4
    assert abs(g["stability_score"] - w["stability_score"]) < 1e-4
    assert g["segmentation"].shape == w["segmentation"].shape == image.shape[:2]
    assert np.mean(g["segmentation"] != w["segmentation"]) < 1e-3
    assert abs(g["area"] - w["area"]) <= 1e-3 * image.shape[0] * image.shape[1]
  # The other output modes: the same masks as RLE / COCO strings.
  gen.output_mode = "coco_rle"
  coco = gen.generate(image)
  for b, c in zip(got, coco):
    assert c["segmentation"] == coco_encode_rle(mask_to_rle(b["segmentation"]))


def test_arguments_checked(tiny):
  model = build_sam2("tiny", str(tiny[1]))
  with pytest.raises(ValueError, match="Exactly one of points_per_side or point_grids"):
    SAM2AutomaticMaskGenerator(model, points_per_side=None)
  with pytest.raises(ValueError, match="output_mode must be one of"):
    SAM2AutomaticMaskGenerator(model, output_mode="png")
