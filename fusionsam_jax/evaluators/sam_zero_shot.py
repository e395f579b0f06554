"""Fig. 7a: SAM zero-shot on the fused image (and on the RGB image) with ORACLE prompts.

Protocol (the paper gives none; this one is stated in every output):

* Prompts come from the ground truth (ORACLE prompts; FusionSAM itself never sees them): for
  every class other than ``background`` present in an image, each 8-connected component of
  its ground-truth pixels with at least ``min_area`` pixels gives one prompt: its bounding
  box ``(x_min, y_min, x_max + 1, y_max + 1)`` in pixels, and one positive point at its most
  interior pixel (the component pixel farthest from the component's border, as SAM's
  interactive evaluation places clicks; always inside the component), ``(x + 0.5, y + 0.5)``.
* SAM (the run's converted checkpoint, `model.sam_checkpoint`) answers each prompt with one
  mask (``multimask_output=False``; ``prompt`` chooses box + point, box or point). SAM 2
  (`Sam2ImagePredictor`, same API) answers the same prompts the same way (its
  ``multimask_output=False`` keeps `sam2`'s dynamic choice of a stable mask).
* Masks become a class map: every pixel starts as ``background``; masks are painted with
  their component's class in order of decreasing component area, so a smaller object
  drawn over a larger one keeps its pixels.
* The class map is scored with the package's confusion matrix (ignore label 255), exactly
  as FusionSAM's evaluation scores its predictions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from scipy import ndimage

from fusionsam_jax.metrics.miou import ConfusionMatrix
from fusionsam_jax.models import functional as F

ORACLE_NOTE = ("ORACLE prompts: one box + one centre point per connected component of each "
               "ground-truth class (SAM is told where every object is; FusionSAM is not)")
PROMPTS = ("box+point", "box", "point")


@dataclasses.dataclass(frozen=True)
class ComponentPrompt:
  """One ground-truth component: its class, area, box (x0, y0, x1, y1) and point (x, y)."""
  cls: int
  area: int
  box: tuple[float, float, float, float]
  point: tuple[float, float]


def component_prompts(label: np.ndarray, *, background: Optional[int] = 0,
                      ignore_index: int = 255, min_area: int = 1) -> list[ComponentPrompt]:
  """ORACLE prompts of one (H, W) label map (see the module docstring), largest first
  (ties: lower class first, then row-major order of the component)."""
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f"label must be (H, W), got {label.shape}")
  out = []
  eight = np.ones((3, 3), bool)
  for c in np.unique(label):
    c = int(c)
    if c == ignore_index or c == background:
      continue
    comps, n = ndimage.label(label == c, structure=eight)
    for i in range(1, n + 1):
      m = comps == i
      area = int(m.sum())
      if area < min_area:
        continue
      ys, xs = np.nonzero(m)
      # Distance to the nearest pixel outside the component (the image border counts as
      # outside), so the argmax is the most interior pixel.
      dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
      y, x = np.unravel_index(int(np.argmax(dist)), m.shape)
      out.append(ComponentPrompt(c, area, (float(xs.min()), float(ys.min()),
                                           float(xs.max() + 1), float(ys.max() + 1)),
                                 (float(x) + 0.5, float(y) + 0.5)))
  out.sort(key=lambda p: (-p.area, p.cls))
  return out


def prompt_mask(predictor, p: ComponentPrompt, prompt: str = "box+point") -> np.ndarray:
  """SAM's single mask (H, W) bool for one component prompt; `predictor` holds the image
  (`set_image`). Works with this package's `SamPredictor` / `Sam2ImagePredictor` and the
  official `SamPredictor` / `SAM2ImagePredictor`."""
  if prompt not in PROMPTS:
    raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
  kw = {}
  if prompt in ("box+point", "point"):
    kw.update(point_coords=np.asarray([p.point], np.float32), point_labels=np.asarray([1]))
  if prompt in ("box+point", "box"):
    kw["box"] = np.asarray(p.box, np.float32)
  masks, _, _ = predictor.predict(**kw, multimask_output=False)
  return np.asarray(masks)[0].astype(bool)


def class_map(shape, prompts: Sequence[ComponentPrompt], masks: Sequence[np.ndarray], *,
              background: Optional[int] = 0, ignore_index: int = 255) -> np.ndarray:
  """Paints masks (in the given order: largest component first) with their classes."""
  out = np.full(shape, ignore_index if background is None else background, np.int32)
  for p, m in zip(prompts, masks):
    out[np.asarray(m, bool)] = p.cls
  return out


def segment_image(predictor, image: np.ndarray, label: np.ndarray, *,
                  prompt: str = "box+point", background: Optional[int] = 0,
                  ignore_index: int = 255, min_area: int = 1) -> np.ndarray:
  """SAM zero-shot class map (H, W) of one uint8 (H, W, 3) image under ORACLE prompts."""
  prompts = component_prompts(label, background=background, ignore_index=ignore_index,
                              min_area=min_area)
  if not prompts:
    return class_map(label.shape, [], [], background=background, ignore_index=ignore_index)
  predictor.set_image(np.asarray(image, np.uint8))
  masks = [prompt_mask(predictor, p, prompt) for p in prompts]
  return class_map(label.shape, prompts, masks, background=background,
                   ignore_index=ignore_index)


def evaluate(predictor, examples: Iterable[dict], num_classes: int, *,
             image_keys: Sequence[str] = ("fused", "rgb"), prompt: str = "box+point",
             background: Optional[int] = 0, ignore_index: int = 255, min_area: int = 1,
             progress: Optional[Callable[[int], None]] = None) -> dict:
  """Scores SAM zero-shot on each of `image_keys` of `examples` (dicts with uint8 (H, W, 3)
  images under those keys and ``label`` (H, W)). Returns {key: ConfusionMatrix}."""
  cms = {k: ConfusionMatrix(num_classes, ignore_index) for k in image_keys}
  for n, ex in enumerate(examples, 1):
    label = np.asarray(ex["label"])
    for k in image_keys:
      pred = segment_image(predictor, ex[k], label, prompt=prompt, background=background,
                           ignore_index=ignore_index, min_area=min_area)
      cms[k].update(pred, label)
    if progress is not None:
      progress(n)
  return cms


def summary(cms: Optional[dict], class_names: Sequence[str], *, prompt: str, split: str,
            num_images: int, fusionsam: Optional[dict] = None, extra: Optional[dict] = None,
            sam2_cms: Optional[dict] = None) -> dict:
  """The JSON record: protocol, per-method IoU of SAM (``methods``, empty when SAM did not
  run) and of SAM 2 (``sam2``: {"methods": ...}, None when SAM 2 did not run)."""
  names = list(class_names)
  rows = {f"SAM zero-shot ({k})": cm.summary(names) for k, cm in (cms or {}).items()}
  sam2 = None
  if sam2_cms is not None:
    sam2 = {"methods": {f"SAM 2 zero-shot ({k})": cm.summary(names)
                        for k, cm in sam2_cms.items()}}
  return dict(protocol=ORACLE_NOTE, prompt=prompt, split=split, num_images=num_images,
              class_names=names, methods=rows, sam2=sam2, fusionsam=fusionsam,
              **(extra or {}))


def fused_examples(config, model, params, batches) -> Iterator[dict]:
  """{"fused", "rgb", "label"} per image of eval-loader `batches`, the fused image from the
  run's frozen fusion path (`models.functional.frozen_fusion`)."""

  fuse = jax.jit(lambda p, b: F.frozen_fusion(
      model, p, F.inputs_from_batch(b, model.modalities))["fused"])
  mods = tuple(model.modalities)
  for batch in batches:
    fused = np.asarray(fuse(params, {m: batch[m] for m in mods}))
    for i in range(fused.shape[0]):
      valid = np.asarray(batch["valid"][i])
      if not valid.any():
        continue  # placeholder padding example
      rows, cols = np.nonzero(valid.any(1))[0], np.nonzero(valid.any(0))[0]
      crop = (slice(0, rows.max() + 1), slice(0, cols.max() + 1))
      f = np.clip(fused[i][crop] * 255.0 + 0.5, 0, 255).astype(np.uint8)
      ex = {"fused": f, "label": np.asarray(batch["label"][i])[crop]}
      if "rgb" in mods:
        ex["rgb"] = np.asarray(batch["rgb"][i])[crop].astype(np.uint8)
      yield ex
