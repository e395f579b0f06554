"""`SamAutomaticMaskGenerator` against the official generator on the same random weights and
image: same number of masks, same boxes, matched masks with IoU >= 0.99, stability scores
and predicted IoUs to 1e-4, same records in every output mode.

Random SAM weights give masks of scattered noise (every box is the whole image). So that the
masks follow image regions, the test model has zero positional embeddings (SAM's own
initialisation), 2x2 transposed-conv kernels equal at all four taps (no checkerboard) and a
larger hypernetwork output (logits of +-10 as a trained SAM's). The image is a few discs.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusionsam_jax.models.sam.amg import SamAutomaticMaskGenerator, coco_encode_rle, nms
from fusionsam_jax.models.sam.predictor import LoadedSam
from fusionsam_jax.models.sam.sam import SAM_PRESETS
from fusionsam_jax.models.sam.checkpoint import convert_state_dict
import sam_reference as ref

CFG = SAM_PRESETS["tiny"]


@pytest.fixture(scope="module")
def models():
  tsam = ref.build_torch_sam(CFG, seed=7)
  with torch.no_grad():
    for n, p in tsam.named_parameters():
      if "output_hypernetworks_mlps" in n and "layers.2" in n:
        p.mul_(100.0)
      if "pos_embed" in n or "rel_pos" in n:
        p.zero_()
      if n.startswith("mask_decoder.output_upscaling.") and p.ndim == 4:
        p.copy_(p[:, :, :1, :1].expand_as(p))
  cfg, params = convert_state_dict({k: v.numpy() for k, v in tsam.state_dict().items()})
  return tsam, LoadedSam(cfg, params)


@pytest.fixture(scope="module")
def image():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:180, :240]
  img = np.zeros((180, 240, 3), np.uint8)
  for _ in range(6):
    cy, cx, r = rng.uniform(0, 180), rng.uniform(0, 240), rng.uniform(15, 60)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
  return img


# Thresholds for this random model (its predicted IoUs are ~0, its small masks' logits are
# ~+-3): 5 masks with 5 different boxes survive out of 768.
KW = dict(points_per_side=16, points_per_batch=64, pred_iou_thresh=0.0,
          stability_score_thresh=0.5, stability_score_offset=0.3, box_nms_thresh=0.7)


def _compare(want, got, exact_segmentation):
  assert len(got) == len(want) > 0
  for w, g in zip(want, got):  # both in NMS order (decreasing predicted IoU)
    assert g["bbox"] == w["bbox"]
    assert g["crop_box"] == w["crop_box"]
    assert g["point_coords"][0] == pytest.approx(w["point_coords"][0])
    assert abs(g["predicted_iou"] - w["predicted_iou"]) < 1e-4
    assert abs(g["stability_score"] - w["stability_score"]) < 1e-4
    if exact_segmentation:
      assert g["segmentation"] == w["segmentation"]
      assert g["area"] == w["area"]


def test_matches_official_binary_masks(models, image):
  tsam, sam = models
  Official = ref.official_amg()
  with torch.no_grad():
    want = Official(tsam, **KW).generate(image)
  with jax.default_matmul_precision("highest"):
    gen = SamAutomaticMaskGenerator(sam, **KW)
    got = gen.generate(image)
  assert len({tuple(r["bbox"]) for r in want}) > 1  # NMS and the boxes are exercised
  _compare(want, got, exact_segmentation=False)
  for w, g in zip(want, got):
    a, b = w["segmentation"], g["segmentation"]
    assert b.dtype == np.bool_ and b.shape == a.shape == image.shape[:2]
    assert (a & b).sum() / (a | b).sum() >= 0.99
    assert abs(g["area"] - w["area"]) <= 0.01 * w["area"]
  # The RLE output modes, on the records already computed (same masks as the official).
  with jax.default_matmul_precision("highest"):
    gen.output_mode = "uncompressed_rle"
    got_rle = gen.generate(image)
  for w, g in zip(want, got_rle):
    assert g["segmentation"]["size"] == list(image.shape[:2])
    back = np.zeros(image.shape[0] * image.shape[1], bool)
    # counts alternate 0-runs and 1-runs in column-major order
    pos = np.cumsum([0] + g["segmentation"]["counts"])
    for s, e in zip(pos[1::2], pos[2::2]):
      back[s:e] = True
    np.testing.assert_array_equal(back.reshape(image.shape[1], image.shape[0]).T,
                                  got[got_rle.index(g)]["segmentation"])


def test_rle_encoders_match_official(image):
  """Our uncompressed and COCO RLE against segment_anything.utils.amg (and pycocotools)."""
  ref.official()
  ref._install_stub_torchvision_ops()
  import segment_anything.utils.amg as oamg
  from fusionsam_jax.models.sam import amg
  rng = np.random.default_rng(3)
  masks = [image[..., 0] > 100, np.zeros((7, 5), bool), np.ones((4, 9), bool),
           rng.random((33, 17)) > 0.5]
  for m in masks:
    want = oamg.mask_to_rle_pytorch(torch.as_tensor(m)[None])[0]
    got = amg.mask_to_rle(m)
    assert got == want
    np.testing.assert_array_equal(amg.rle_to_mask(got), oamg.rle_to_mask(want))
    assert amg.area_from_rle(got) == oamg.area_from_rle(want) == m.sum()
    pytest.importorskip("pycocotools")
    assert coco_encode_rle(got) == oamg.coco_encode_rle(want)


def test_nms_matches_stand_in():
  """Our numpy NMS against the torch stand-in of torchvision's batched_nms."""
  ref.official()
  ref._install_stub_torchvision_ops()
  from torchvision.ops.boxes import batched_nms
  rng = np.random.default_rng(4)
  xy = rng.integers(0, 50, (200, 2))
  boxes = np.concatenate([xy, xy + rng.integers(1, 30, (200, 2))], 1)
  scores = rng.random(200).astype(np.float32)
  for thr in (0.3, 0.7):
    want = batched_nms(torch.as_tensor(boxes).float(), torch.as_tensor(scores),
                       torch.zeros(200), thr).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, thr), want)


def test_small_region_cleanup_matches_official(image):
  """min_mask_region_area: our cleanup + NMS against the official static method (cv2)."""
  pytest.importorskip("cv2")
  Official = ref.official_amg()
  from segment_anything.utils.amg import MaskData
  from fusionsam_jax.models.sam import amg
  rng = np.random.default_rng(5)
  masks = []
  for k in range(6):  # region masks with specks and holes, some near-duplicates
    m = image[..., k % 3] > 60 + 20 * k
    m ^= rng.random(m.shape) > 0.995
    masks.append(m)
  masks.append(masks[0].copy())
  rles = [amg.mask_to_rle(m) for m in masks]
  boxes = amg._mask_boxes_np(np.stack(masks))
  iou = rng.random(len(masks)).astype(np.float32)
  want = Official.postprocess_small_regions(
      MaskData(rles=[dict(r) for r in rles], boxes=torch.as_tensor(boxes),
               iou_preds=torch.as_tensor(iou)), 50, 0.7)
  got = SamAutomaticMaskGenerator._postprocess_small_regions(
      {"rles": [dict(r) for r in rles], "boxes": boxes.copy(), "iou_preds": iou}, 50, 0.7)
  assert len(got["rles"]) == len(want["rles"]) < len(masks)
  assert got["rles"] == want["rles"]
  np.testing.assert_array_equal(got["boxes"], want["boxes"].numpy())
  np.testing.assert_array_equal(got["iou_preds"], want["iou_preds"].numpy())


def test_matches_official_with_crops(models, image):
  """crop_n_layers=1: per-crop embeddings, crop-edge filtering and crop NMS run. (With this
  model no mask from the four crops survives the filters and NMS, in either
  implementation: the surviving masks all come from the full-image crop.)"""
  tsam, sam = models
  kw = dict(KW, crop_n_layers=1, crop_n_points_downscale_factor=2, crop_overlap_ratio=0.25,
            output_mode="uncompressed_rle")
  Official = ref.official_amg()
  with torch.no_grad():
    want = Official(tsam, **kw).generate(image)
  with jax.default_matmul_precision("highest"):
    got = SamAutomaticMaskGenerator(sam, **kw).generate(image)
  _compare(want, got, exact_segmentation=False)
  from fusionsam_jax.models.sam.amg import rle_to_mask
  for w, g in zip(want, got):
    wm, gm = rle_to_mask(w["segmentation"]), rle_to_mask(g["segmentation"])
    assert (wm & gm).sum() / (wm | gm).sum() >= 0.99
