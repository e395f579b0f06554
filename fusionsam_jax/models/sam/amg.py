"""`SamAutomaticMaskGenerator`: the official automatic mask generator on the Flax port.

  generator = SamAutomaticMaskGenerator(sam_model_registry["vit_h"](checkpoint=...))
  records = generator.generate(image)   # uint8 (H, W, 3)

Same arguments, same algorithm and the same output records as
`segment_anything.SamAutomaticMaskGenerator`: a point grid per crop, masks filtered by
predicted IoU, stability score and crop-edge boxes, box NMS per crop and across crops,
optional small-region cleanup, and `binary_mask` / `uncompressed_rle` / `coco_rle` output
(the COCO string is encoded here; pycocotools is not needed).

The per-batch work (decoder, postprocessing to the crop size, stability scores, boxes) is
one jitted program with fixed shapes: the last batch is padded to `points_per_batch`,
the output is padded to a size bucket and the padding is excluded from every count.
Masks come back to the host bit-packed, and only for masks that pass the filters.
"""

import math
from itertools import product
from typing import Any, Dict, List, Optional, Tuple, Union

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from fusionsam_jax.models.sam.predictor import LoadedSam, SamPredictor
from fusionsam_jax.models.sam.sam import Sam
from fusionsam_jax.models.sam.transforms import bilinear_taps, postprocess_masks_padded, size_bucket

# ---- the official helpers (segment_anything.utils.amg), in numpy ---------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
  """(n*n, 2) points evenly spaced in [0, 1]^2, x fastest."""
  offset = 1 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs = np.tile(side[None, :], (n_per_side, 1))
  ys = np.tile(side[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int):
  return [build_point_grid(int(n_per_side / (scale_per_layer ** i)))
          for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int, overlap_ratio: float):
  """Crop boxes (xyxy) of every layer, layer i having (2**i)**2 crops, and their layers."""
  im_h, im_w = im_size
  short_side = min(im_h, im_w)
  boxes, layers = [[0, 0, im_w, im_h]], [0]
  for i_layer in range(n_layers):
    n = 2 ** (i_layer + 1)
    overlap = int(overlap_ratio * short_side * (2 / n))
    crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
    crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
    x0s = [int((crop_w - overlap) * i) for i in range(n)]
    y0s = [int((crop_h - overlap) * i) for i in range(n)]
    for x0, y0 in product(x0s, y0s):
      boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layers.append(i_layer + 1)
  return boxes, layers


def box_area(boxes: np.ndarray) -> np.ndarray:
  boxes = np.asarray(boxes)
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Greedy NMS as torchvision's: indices kept, by decreasing score (ties: input order);
  a box is dropped when its IoU with a kept one is > iou_threshold."""
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores)
  if len(boxes) == 0:
    return np.zeros((0,), np.int64)
  order = np.argsort(-scores, kind="stable")
  x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
  areas = (x2 - x1) * (y2 - y1)
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for pos, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(i)
    rest = order[pos + 1:]
    rest = rest[~suppressed[rest]]
    if not len(rest):
      continue
    w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
    h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
    inter = w * h
    iou = inter / (areas[i] + areas[rest] - inter)
    suppressed[rest[iou > iou_threshold]] = True
  return np.asarray(keep, np.int64)


def is_box_near_crop_edge(boxes, crop_box, orig_box, atol: float = 20.0) -> np.ndarray:
  """Boxes (crop frame) touching a crop edge that is not an image edge."""
  crop = np.asarray(crop_box, np.float32)
  orig = np.asarray(orig_box, np.float32)
  b = (np.asarray(boxes) + np.asarray(crop_box[:2] * 2)).astype(np.float32)
  near_crop = np.abs(b - crop[None]) <= atol
  near_image = np.abs(b - orig[None]) <= atol
  return np.any(near_crop & ~near_image, axis=1)


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
  """Uncompressed COCO RLE of an (H, W) bool mask (column-major runs, starting with 0s)."""
  h, w = mask.shape
  flat = np.asarray(mask, bool).T.ravel()
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  idx = np.concatenate([[0], change, [h * w]])
  counts = np.diff(idx).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts
  return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
  h, w = rle["size"]
  counts = np.asarray(rle["counts"], np.int64)
  values = np.arange(len(counts)) % 2 == 1
  flat = np.repeat(values, counts)
  return flat.reshape(w, h).T


def area_from_rle(rle: Dict[str, Any]) -> int:
  return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: Dict[str, Any]) -> Dict[str, Any]:
  """Compressed COCO RLE (the string pycocotools' `frPyObjects` writes)."""
  counts = rle["counts"]
  out = []
  for i, c in enumerate(counts):
    x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
    more = True
    while more:
      b = x & 0x1F
      x >>= 5
      more = (x != -1) if (b & 0x10) else (x != 0)
      if more:
        b |= 0x20
      out.append(chr(b + 48))
  return {"size": list(rle["size"]), "counts": "".join(out)}


def box_xyxy_to_xywh(box) -> List:
  x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box)
  return [x0, y0, x1 - x0, y1 - y0]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str):
  """Removes small islands (mode="islands") or fills small holes ("holes"); 8-connected.
  Returns (mask, changed). Uses OpenCV when installed (as the official code), else scipy."""
  if mode not in ("holes", "islands"):
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
  correct_holes = mode == "holes"
  working = (correct_holes ^ mask).astype(np.uint8)
  try:
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, -1][1:]
  except ImportError:
    regions, n = ndimage.label(working, structure=np.ones((3, 3), int))
    n_labels = n + 1
    sizes = np.bincount(regions.ravel(), minlength=n_labels)[1:]
  small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
  if not small:
    return mask, False
  fill = [0] + small
  if not correct_holes:
    fill = [i for i in range(n_labels) if i not in fill]
    if not fill:  # every region is small: keep the largest
      fill = [int(np.argmax(sizes)) + 1]
  return np.isin(regions, fill), True


# ---- the generator ------------------------------------------------------------------------


def _mask_boxes(masks, valid_h, valid_w):
  """xyxy boxes of (..., H, W) bool masks ([0, 0, 0, 0] when empty), as SAM's
  `batched_mask_to_box`."""
  h, w = masks.shape[-2:]
  in_h = masks.any(-1)
  in_w = masks.any(-2)
  ys = jnp.arange(h)
  xs = jnp.arange(w)
  bottom = jnp.max(jnp.where(in_h, ys, 0), -1)
  top = jnp.min(jnp.where(in_h, ys, valid_h), -1)
  right = jnp.max(jnp.where(in_w, xs, 0), -1)
  left = jnp.min(jnp.where(in_w, xs, valid_w), -1)
  empty = (right < left) | (bottom < top)
  out = jnp.stack([left, top, right, bottom], -1)
  return jnp.where(empty[..., None], 0, out)


def _mask_boxes_np(masks: np.ndarray) -> np.ndarray:
  """numpy `_mask_boxes` for (N, H, W) bool masks."""
  in_h, in_w = masks.any(-1), masks.any(-2)
  out = np.zeros((len(masks), 4), np.int64)
  for i in range(len(masks)):
    ys, xs = np.flatnonzero(in_h[i]), np.flatnonzero(in_w[i])
    if len(ys) and len(xs):
      out[i] = [xs[0], ys[0], xs[-1], ys[-1]]
  return out


class SamAutomaticMaskGenerator:
  """Masks for a whole image from a grid of point prompts (the official generator's API)."""

  def __init__(self, model: Union[LoadedSam, SamPredictor], points_per_side: Optional[int] = 32,
               points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
               stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
               box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
               crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
               crop_n_points_downscale_factor: int = 1,
               point_grids: Optional[List[np.ndarray]] = None,
               min_mask_region_area: int = 0, output_mode: str = "binary_mask"):
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
    if points_per_side is not None:
      self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                     crop_n_points_downscale_factor)
    else:
      self.point_grids = [np.asarray(g, np.float64) for g in point_grids]
    if len(self.point_grids) < crop_n_layers + 1:
      raise ValueError(f"{len(self.point_grids)} point grids for {crop_n_layers + 1} layers")
    if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
      raise ValueError(f"Unknown output_mode {output_mode!r}.")
    if points_per_batch < 1:
      raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    self.predictor = model if isinstance(model, SamPredictor) else SamPredictor(model)
    self.points_per_batch = points_per_batch
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.box_nms_thresh = box_nms_thresh
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = crop_nms_thresh
    self.crop_overlap_ratio = crop_overlap_ratio
    self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode
    self._batch = jax.jit(self._batch_impl)

  def _batch_impl(self, params, features, coords, taps_y, taps_x, valid_hw, offset):
    p = self.predictor
    b = coords.shape[0]
    e4 = 4 * p.config.image_embedding_size
    pts = jnp.concatenate([coords[:, None, :], jnp.zeros((b, 1, 2), coords.dtype)], 1)
    labels = jnp.broadcast_to(jnp.asarray([1, -1], jnp.int32), (b, 2))
    low, iou = p.module.apply(
        {"params": params}, features[:1], pts, labels, jnp.ones((b, 2), bool),
        jnp.zeros((b, 4), jnp.float32), jnp.zeros((b,), bool),
        jnp.zeros((b, e4, e4, 1), jnp.float32), jnp.zeros((b,), bool), True,
        method=Sam.decode_padded)
    logits = postprocess_masks_padded(low, taps_y, taps_x, p.config.img_size)
    hh, ww = logits.shape[-2:]
    inside = ((jnp.arange(hh) < valid_hw[0])[:, None] & (jnp.arange(ww) < valid_hw[1])[None])
    thr = p.mask_threshold
    # One stacked comparison: separate consumers of `logits` make XLA:CPU ~10x slower.
    binary = jnp.stack([logits > thr + offset, logits > thr - offset, logits > thr]) & inside
    counts = jnp.sum(binary[:2], (-1, -2), dtype=jnp.int32)
    stability = counts[0].astype(jnp.float32) / counts[1].astype(jnp.float32)
    masks = binary[2]
    boxes = _mask_boxes(masks, valid_hw[0], valid_hw[1])
    return iou, stability, boxes, jnp.packbits(masks, axis=-1)

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """Records with segmentation, area, bbox (XYWH), predicted_iou, point_coords,
    stability_score and crop_box (XYWH), as the official generator returns."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"generate expects a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    data = self._generate_masks(image)
    if self.min_mask_region_area > 0:
      data = self._postprocess_small_regions(data, self.min_mask_region_area,
                                             max(self.box_nms_thresh, self.crop_nms_thresh))
    records = []
    for i in range(len(data["iou_preds"])):
      rle = data["rles"][i]
      if self.output_mode == "coco_rle":
        seg = coco_encode_rle(rle)
      elif self.output_mode == "binary_mask":
        seg = rle_to_mask(rle)
      else:
        seg = rle
      records.append({
          "segmentation": seg,
          "area": area_from_rle(rle),
          "bbox": box_xyxy_to_xywh(data["boxes"][i]),
          "predicted_iou": float(data["iou_preds"][i]),
          "point_coords": [data["points"][i].tolist()],
          "stability_score": float(data["stability_score"][i]),
          "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]),
      })
    return records

  def _generate_masks(self, image):
    orig_size = image.shape[:2]
    crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers,
                                                 self.crop_overlap_ratio)
    parts = [self._process_crop(image, cb, li, orig_size)
             for cb, li in zip(crop_boxes, layer_idxs)]
    data = {k: [x for p in parts for x in p[k]] if k == "masks" else
            np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(crop_boxes) > 1:
      scores = 1 / box_area(data["crop_boxes"]).astype(np.float32)
      data = _take(data, nms(data["boxes"], scores, self.crop_nms_thresh))
    # RLEs only for the survivors, in the original frame.
    h, w = orig_size
    rles = []
    for m, cb in zip(data.pop("masks"), data["crop_boxes"]):
      full = np.zeros((h, w), bool)
      full[cb[1]:cb[3], cb[0]:cb[2]] = m
      rles.append(mask_to_rle(full))
    data["rles"] = rles
    return data

  def _process_crop(self, image, crop_box, layer_idx, orig_size):
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1, :]
    ch, cw = crop.shape[:2]
    p = self.predictor
    p.set_image(crop)
    points = self.point_grids[layer_idx] * np.array([cw, ch])[None]
    (ih, iw) = p.input_sizes[0]
    taps_y = bilinear_taps(ih, ch, size_bucket(ch))
    taps_x = bilinear_taps(iw, cw, size_bucket(cw))
    valid_hw = np.array([ch, cw], np.int32)
    n_b = self.points_per_batch
    iou_l, stab_l, box_l, pts_l, masks_l = [], [], [], [], []
    for start in range(0, len(points), n_b):
      pts = points[start:start + n_b]
      n = len(pts)
      coords = np.zeros((n_b, 2), np.float32)
      coords[:n] = p.transform.apply_coords(pts, (ch, cw))
      iou, stab, boxes, packed = self._batch(p.params, p.features, coords, taps_y, taps_x,
                                             valid_hw, np.float32(self.stability_score_offset))
      iou, stab, boxes = (np.asarray(a)[:n].reshape(n * a.shape[1], *a.shape[2:])
                          for a in (iou, stab, boxes))
      keep = np.ones(len(iou), bool)
      if self.pred_iou_thresh > 0.0:
        keep &= iou > self.pred_iou_thresh
      if self.stability_score_thresh > 0.0:
        keep &= stab >= self.stability_score_thresh
      keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
      idx = np.flatnonzero(keep)
      if not len(idx):
        continue
      packed = np.asarray(packed)[:n].reshape(n * 3, *packed.shape[2:])[idx]
      masks_l += list(np.unpackbits(packed, axis=-1, count=packed.shape[-1] * 8)
                      [:, :ch, :cw].astype(bool))
      iou_l.append(iou[idx])
      stab_l.append(stab[idx])
      box_l.append(boxes[idx])
      pts_l.append(np.repeat(pts, 3, axis=0)[idx])
    p.reset_image()
    data = {
        "iou_preds": np.concatenate(iou_l) if iou_l else np.zeros((0,), np.float32),
        "stability_score": np.concatenate(stab_l) if stab_l else np.zeros((0,), np.float32),
        "boxes": np.concatenate(box_l) if box_l else np.zeros((0, 4), np.int64),
        "points": np.concatenate(pts_l) if pts_l else np.zeros((0, 2)),
        "masks": masks_l,
    }
    data = _take(data, nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
    data["boxes"] = data["boxes"].astype(np.int64) + np.array([x0, y0, x0, y0])
    data["points"] = data["points"] + np.array([x0, y0])
    data["crop_boxes"] = np.array([crop_box] * len(data["iou_preds"]),
                                  np.int64).reshape(-1, 4)
    return data

  @staticmethod
  def _postprocess_small_regions(data, min_area: int, nms_thresh: float):
    """Fills small holes and removes small islands, then NMS preferring unchanged masks."""
    if not data["rles"]:
      return data
    new_masks, scores = [], []
    for rle in data["rles"]:
      mask = rle_to_mask(rle)
      mask, changed_h = remove_small_regions(mask, min_area, mode="holes")
      mask, changed_i = remove_small_regions(mask, min_area, mode="islands")
      new_masks.append(mask)
      scores.append(float(not (changed_h or changed_i)))
    masks = np.stack(new_masks)
    boxes = _mask_boxes_np(masks)
    keep = nms(boxes, np.asarray(scores, np.float32), nms_thresh)
    for i in keep:
      if scores[i] == 0.0:
        data["rles"][i] = mask_to_rle(masks[i])
        data["boxes"][i] = boxes[i]
    return _take(data, keep)


def _take(data, idx):
  return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in data.items()}
