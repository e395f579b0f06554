"""`SAM2AutomaticMaskGenerator`: `sam2.automatic_mask_generator` on the Flax SAM 2 port.

  generator = SAM2AutomaticMaskGenerator(build_sam2(config, checkpoint))
  records = generator.generate(image)   # uint8 (H, W, 3)

Same arguments, algorithm and records as the official generator: a point grid per crop, each
point a one-click prompt (three masks with `multimask_output`), masks filtered by predicted
IoU and stability score (optionally after one mask-to-mask refinement, `use_m2m`), boxes
touching a crop edge dropped, box NMS per crop and across crops, and `binary_mask` /
`uncompressed_rle` / `coco_rle` records (the COCO string encoded here; no pycocotools).
`min_mask_region_area` goes to the predictor as `max_hole_area` / `max_sprinkle_area`, as in
sam2 (whose CPU build skips that step with a warning when its CUDA extension is missing).

The points run `points_per_batch` at a time through one decoder program (the last batch
padded); the upsampling to the crop size, the stability scores and the mask boxes are one
jitted program per crop size, and masks come back to the host bit-packed.
"""

from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax.models.sam.amg import (_mask_boxes, _take, area_from_rle, box_area,
                                          box_xyxy_to_xywh, build_all_layer_point_grids,
                                          coco_encode_rle, generate_crop_boxes,
                                          is_box_near_crop_edge, mask_to_rle, nms,
                                          rle_to_mask)
from fusionsam_jax.models.sam2.build import build_sam2_hf
from fusionsam_jax.models.sam2.interp import bilinear_matrix, resize_2d
from fusionsam_jax.models.sam2.predictor import SAM2ImagePredictor, _remove_small_regions

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _masks_impl(low_res, crop_hw, threshold, offset):
  """Low-res logits (P, M, h, w) -> stability (P, M), boxes (P, M, 4) and bit-packed masks
  (P, M, H, ceil(W / 8)) at the crop size."""
  logits = resize_2d(low_res, crop_hw, bilinear_matrix)
  binary = jnp.stack([logits > threshold + offset, logits > threshold - offset,
                      logits > threshold])
  counts = jnp.sum(binary[:2], (-1, -2), dtype=jnp.int32)
  stability = counts[0].astype(jnp.float32) / counts[1].astype(jnp.float32)
  masks = binary[2]
  boxes = _mask_boxes(masks, crop_hw[0], crop_hw[1])
  return stability, boxes, jnp.packbits(masks, axis=-1)


class SAM2AutomaticMaskGenerator:
  """Generates masks for a whole image from a grid of point prompts."""

  def __init__(self, model, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
               pred_iou_thresh: float = 0.8, stability_score_thresh: float = 0.95,
               stability_score_offset: float = 1.0, mask_threshold: float = 0.0,
               box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
               crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
               crop_n_points_downscale_factor: int = 1,
               point_grids: Optional[List[np.ndarray]] = None, min_mask_region_area: int = 0,
               output_mode: str = "binary_mask", use_m2m: bool = False,
               multimask_output: bool = True, **kwargs):
    """The official arguments; `model` is what `build_sam2` returns. Other keyword
    arguments go to the predictor (e.g. `compiler_options`)."""
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got "
                       f"{output_mode!r}")
    if points_per_batch < 1:
      raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    if points_per_side is not None:
      self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                     crop_n_points_downscale_factor)
    else:
      self.point_grids = [np.asarray(g) for g in point_grids]
    pred_kwargs = {k: v for k, v in kwargs.items()
                   if k in ("compiler_options", "encoder_dtype", "attn_impl")}
    self.predictor = SAM2ImagePredictor(model, max_hole_area=min_mask_region_area,
                                        max_sprinkle_area=min_mask_region_area,
                                        prompt_batch=points_per_batch, point_bucket_min=1,
                                        **pred_kwargs)
    self.points_per_batch = points_per_batch
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.mask_threshold = mask_threshold
    self.box_nms_thresh = box_nms_thresh
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = crop_nms_thresh
    self.crop_overlap_ratio = crop_overlap_ratio
    self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode
    self.use_m2m = use_m2m
    self.multimask_output = multimask_output
    jit = jax.jit if not pred_kwargs.get("compiler_options") else (
        lambda f, **kw: jax.jit(f, compiler_options=pred_kwargs["compiler_options"], **kw))
    self._masks = jit(_masks_impl, static_argnames=("crop_hw",))

  @classmethod
  def from_pretrained(cls, model_id: str, **kwargs) -> "SAM2AutomaticMaskGenerator":
    """A local folder (a `facebook/sam2*` download or a converted directory) or a Hugging
    Face id, as `SAM2ImagePredictor.from_pretrained`."""
    return cls(build_sam2_hf(model_id, **kwargs), **kwargs)

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """uint8 (H, W, 3) -> records {segmentation, area, bbox (xywh), predicted_iou,
    point_coords, stability_score, crop_box (xywh)}, in the official order."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    data = self._generate_masks(image)
    if self.output_mode == "coco_rle":
      segs = [coco_encode_rle(r) for r in data["rles"]]
    elif self.output_mode == "binary_mask":
      segs = [rle_to_mask(r) for r in data["rles"]]
    else:
      segs = data["rles"]
    return [{
        "segmentation": segs[i],
        "area": area_from_rle(data["rles"][i]),
        "bbox": box_xyxy_to_xywh(data["boxes"][i]),
        "predicted_iou": float(data["iou_preds"][i]),
        "point_coords": [data["points"][i].tolist()],
        "stability_score": float(data["stability_score"][i]),
        "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]),
    } for i in range(len(segs))]

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
    h, w = orig_size
    rles = []
    for m, cb in zip(data.pop("masks"), data["crop_boxes"]):
      full = np.zeros((h, w), bool)
      full[cb[1]:cb[3], cb[0]:cb[2]] = m
      rles.append(mask_to_rle(full))
    data["rles"] = rles
    return data

  def _batch(self, pts, crop_hw, mask_input=None):
    """One batch of points (n, 2) in crop pixels -> iou (n*M,), stability (n*M,), boxes
    (n*M, 4), packed masks (n*M, H, W/8); a mask input (n, 1, h, w) makes it the m2m
    refinement (one mask per point)."""
    p = self.predictor
    n = len(pts)
    multi = self.multimask_output if mask_input is None else False
    low, iou, clamped = p._low_res(pts[:, None, :], np.ones((n, 1), np.int32), None, mask_input,
                             multi, True, 0)
    if p.max_hole_area > 0 or p.max_sprinkle_area > 0:
      low = _remove_small_regions(low, p.mask_threshold, p.max_hole_area,
                                  p.max_sprinkle_area)
    padded = np.zeros((self.points_per_batch,) + low.shape[1:], np.float32)
    padded[:n] = low
    stab, boxes, packed = self._masks(padded, crop_hw=crop_hw,
                                      threshold=np.float32(self.mask_threshold),
                                      offset=np.float32(self.stability_score_offset))
    m = low.shape[1]
    flat = lambda a: np.asarray(a)[:n].reshape((n * m,) + a.shape[2:])
    # The clamped logits, as sam2's `_predict` returns them, feed the m2m refinement.
    return (iou.reshape(-1), flat(stab), flat(boxes), flat(packed),
            clamped.reshape((n * m, 1) + clamped.shape[2:]))

  def _process_crop(self, image, crop_box, layer_idx, orig_size):
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1, :]
    ch, cw = crop.shape[:2]
    p = self.predictor
    p.set_image(crop)
    points = (self.point_grids[layer_idx] * np.array([cw, ch])[None]).astype(np.float32)
    nb = self.points_per_batch
    iou_l, stab_l, box_l, pts_l, masks_l = [], [], [], [], []
    for start in range(0, len(points), nb):
      pts = points[start:start + nb]
      iou, stab, boxes, packed, low = self._batch(pts, (ch, cw))
      m = len(iou) // len(pts)
      pts_rep = np.repeat(pts, m, axis=0)
      if self.use_m2m:
        # sam2 refines every mask (before any filter) with its own point and low-res logits.
        parts = [self._batch(pts_rep[i:i + nb], (ch, cw), low[i:i + nb])
                 for i in range(0, len(iou), nb)]
        iou, stab, boxes, packed = (np.concatenate([q[j] for q in parts]) for j in range(4))
      keep = np.ones(len(iou), bool)
      if self.pred_iou_thresh > 0.0:
        keep &= iou > self.pred_iou_thresh
      if self.stability_score_thresh > 0.0:
        keep &= stab >= self.stability_score_thresh
      keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
      idx = np.flatnonzero(keep)
      if not len(idx):
        continue
      masks_l += list(np.unpackbits(packed[idx], axis=-1, count=packed.shape[-1] * 8)
                      [:, :ch, :cw].astype(bool))
      iou_l.append(iou[idx])
      stab_l.append(stab[idx])
      box_l.append(boxes[idx])
      pts_l.append(pts_rep[idx])
    p.reset_predictor()
    data = {
        "iou_preds": np.concatenate(iou_l) if iou_l else np.zeros((0,), np.float32),
        "stability_score": np.concatenate(stab_l) if stab_l else np.zeros((0,), np.float32),
        "boxes": np.concatenate(box_l) if box_l else np.zeros((0, 4), np.int64),
        "points": np.concatenate(pts_l) if pts_l else np.zeros((0, 2), np.float32),
        "masks": masks_l,
    }
    data = _take(data, nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
    data["boxes"] = data["boxes"].astype(np.int64) + np.array([x0, y0, x0, y0])
    data["points"] = data["points"] + np.array([x0, y0], np.float32)
    data["crop_boxes"] = np.array([crop_box] * len(data["iou_preds"]),
                                  np.int64).reshape(-1, 4)
    return data
