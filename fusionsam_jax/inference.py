"""A trained run as a function: ``Predictor(workdir)(element) -> class map, fused image``.

    from fusionsam_jax.inference import Predictor
    predictor = Predictor("runs/mfnet")                       # best checkpoint by val mIoU
    out = predictor({"rgb": rgb, "thermal": thermal})         # uint8 (H, W, 3), (H, W[, 1])
    out["pred"]        # (H, W) int32 class ids
    out["probs"]       # (H, W, K) float32 class probabilities (with probabilities=True)
    predictor.write("00001D", element, "out/")                # labels/ color/ overlay/ fused/

`write_outputs` is what ``python -m fusionsam_jax.predict`` writes per image.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from fusionsam_jax import experiment, workdir as W
from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.data.datasets.base import palette_lut
from fusionsam_jax.data.io import to_rgb, write_png
from fusionsam_jax.fsutil import atomic_file
from fusionsam_jax.models.functional import predict_fn


def _write_png_atomic(path: str, arr: np.ndarray) -> None:
  with atomic_file(path) as tmp:
    write_png(tmp, arr)


class Predictor:
  """A trained run, ready to segment samples: ``Predictor(workdir)(element) -> outputs``."""

  def __init__(self, workdir: str, checkpoint: str | int = "best", config=None):
    """Restores `checkpoint` ("best" by val mIoU, "latest" or a step) of the run in
    `workdir`, with its stored config (or `config`, checked against it)."""
    config = W.load_config(workdir) if config is None else config
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    ctx = experiment.context(config, workdir, mesh=mesh, data=False, progress=False)
    params, step, which = experiment.restore_params(config, workdir, checkpoint, ctx=ctx)
    self._setup(config, ctx.model, params, step, which)

  @classmethod
  def from_params(cls, config, model, params, step: int = 0, which: str = "params"
                  ) -> "Predictor":
    """A predictor of params already in memory (the trainer's, after its evaluation)."""
    self = cls.__new__(cls)
    self._setup(config, model, params, step, which)
    return self

  def _setup(self, config, model, params, step, which) -> None:
    self.config, self.model, self.params = config, model, params
    self.step, self.which = step, which
    self.info = get_info(config.dataset)
    self.modalities = tuple(config.model.modalities)
    self.pad_multiple = int(config.eval.pad_multiple)
    self._predict = jax.jit(predict_fn(model))

  def __call__(self, element: dict, *, probabilities: bool = False) -> dict:
    """element: modality -> uint8 (H, W, C) (a grey modality may be (H, W)). Returns pred
    (H, W) int32 class ids and fused (H, W, 3) uint8; prob (H, W) float32 for saliency (the
    salient class); with `probabilities`, probs (H, W, K) float32 -- all cropped to the
    input size."""
    missing = [m for m in self.modalities if m not in element]
    if missing:
      raise ValueError(f"Predictor: the run takes {', '.join(self.modalities)}; missing "
                       f"{', '.join(missing)}")
    h, w = np.shape(element[self.modalities[0]])[:2]
    m = self.pad_multiple
    th, tw = -(-h // m) * m, -(-w // m) * m
    batch = {}
    for k in self.modalities:
      a = np.asarray(element[k])
      a = a[..., None] if a.ndim == 2 else a
      if a.shape[:2] != (h, w) or a.dtype != np.uint8:
        raise ValueError(f"Predictor: {k} is {a.dtype} {a.shape}; expected uint8 of the "
                         f"size of {self.modalities[0]} ({h}, {w})")
      batch[k] = np.pad(a, [(0, th - h), (0, tw - w), (0, 0)])[None]
    out = jax.device_get(self._predict(self.params, batch))
    res = {"pred": np.asarray(out["pred"])[0, :h, :w].astype(np.int32),
           "fused": np.round(np.clip(np.asarray(out["fused"])[0, :h, :w], 0, 1) * 255
                             ).astype(np.uint8)}
    if probabilities:
      res["probs"] = np.asarray(out["probs"], np.float32)[0, :h, :w]
    if self.config.model.task == "saliency":
      logits = np.asarray(out["logits"], np.float32)[0, :h, :w]
      e = np.exp(logits - logits.max(-1, keepdims=True))
      res["prob"] = (e / e.sum(-1, keepdims=True))[..., 1]
    return res

  def write(self, name: str, element: dict, out_dir: str) -> list[str]:
    """Segments `element` and writes its outputs (`write_outputs`); returns the paths."""
    return write_outputs(out_dir, name, self(element), element, self.info.palette)


#: Output sub-folders of `predict`, each holding ``<name>.png`` (the ground truth's name).
OUTPUT_DIRS = ("labels", "color", "overlay", "fused", "saliency")


def overlay(base: np.ndarray, pred: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
  """The palette colours of `pred` blended over `base` (uint8 (H, W, 3)) with weight
  `alpha`; class 0 (unlabeled / background) is left unblended, so the scene stays visible."""
  base = to_rgb(np.asarray(base), "overlay base")
  lut = palette_lut(palette)
  pred = np.asarray(pred)
  color = lut[pred.astype(np.uint8)].astype(np.float32)
  mixed = np.round((1 - alpha) * base.astype(np.float32) + alpha * color).astype(np.uint8)
  return np.where((pred == 0)[..., None], base, mixed)


def write_outputs(out_dir: str, name: str, res: dict, element: dict, palette) -> list[str]:
  """Writes one sample's outputs, each atomically, as ``OUT/<kind>/<name>.png``:

  * ``labels/``: class ids (single channel, 0..K-1): the ground truth's format and name, so
    ``python -m fusionsam_jax.metrics.miou --pred_dir OUT/labels --gt_dir GT`` reads them;
  * ``color/``: the prediction in the dataset's palette;
  * ``overlay/``: the palette colours blended over the RGB input (or the fused image), class 0
    left unblended;
  * ``fused/``: the fused image (RGB);
  * ``saliency/`` (saliency task): the salient-class probability x 255, for
    ``python -m fusionsam_jax.metrics.sod --pred_dir OUT/saliency``.

  `res` is `Predictor.__call__`'s result (pred, fused [, prob]).
  """
  pred = np.asarray(res["pred"])
  if pred.min(initial=0) < 0 or pred.max(initial=0) > 255:
    raise ValueError(f"{name}: class ids outside 0..255 cannot be written as 8-bit PNG")
  lut = palette_lut(palette)
  base = element["rgb"] if "rgb" in element else res["fused"]
  files = {"labels": pred.astype(np.uint8), "color": lut[pred.astype(np.uint8)],
           "overlay": overlay(base, pred, palette), "fused": res["fused"]}
  if "prob" in res:
    files["saliency"] = np.round(np.clip(res["prob"], 0, 1) * 255).astype(np.uint8)
  paths = []
  for kind, arr in files.items():
    d = os.path.join(out_dir, kind)
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, f"{name}.png")
    _write_png_atomic(p, arr)
    paths.append(p)
  return paths
