"""Salient-object-detection metrics, computed as PySODMetrics (``py_sod_metrics``) does.

Numpy only; an independent implementation of the published definitions with the
normalisation and threshold conventions that PySODMetrics (and the MATLAB toolboxes it
mirrors) uses, so that numbers are comparable with the field:

* **Input normalisation** (``normalize=True``, uint8 grey images): GT is binarised as
  ``gt > 128``; the prediction is ``pred / 255`` (float64) and, unless it is constant,
  min-max stretched to ``[0, 1]`` (MATLAB ``mapminmax(im2double(.))``). A constant
  prediction is left at ``pred / 255``. With ``normalize=False`` the caller passes a
  float prediction in ``[0, 1]`` and a boolean GT.
* **MAE**: ``mean(|pred - gt|)`` per image, averaged over images.
* **S-measure** (Fan et al., ICCV 2017), ``alpha = 0.5``: all-background GT gives
  ``1 - mean(pred)``, all-foreground GT gives ``mean(pred)``; otherwise
  ``max(0, alpha * S_object + (1 - alpha) * S_region)``. S_object uses the sample standard
  deviation (ddof = 1) and ``eps = np.spacing(1)``; S_region splits the image at the GT
  centroid ``(round(mean row) + 1, round(mean column) + 1)`` (numpy round-half-to-even) into
  four blocks weighted by area, each scored by the block SSIM with ``(N - 1 + eps)``
  normalised (co)variances. A block of zero area contributes 0 (its weight is 0);
  PySODMetrics returns nan in that corner case (all GT foreground in the last row/column).
* **Thresholds**: the dynamic curves binarise the quantised prediction
  ``q = uint8(trunc(pred * 255))`` at ``q >= t`` for ``t = 0 .. 255`` (256 thresholds).
  **The curves returned here are indexed by the threshold ``t`` in ascending order**
  (PySODMetrics stores them descending, index ``i`` <-> ``t = 255 - i``); mean and max
  are unaffected. Per-image curves are averaged over images first; ``meanXm`` / ``maxXm``
  are the mean / max of that averaged curve.
* **Adaptive threshold**: ``min(2 * mean(pred), 1)`` on the float prediction, binarised
  as ``pred >= threshold``.
* **E-measure** (Fan et al., IJCAI 2018): enhanced alignment of the binarised prediction
  with the GT; for all-background GT the sum of the enhanced matrix is the number of
  predicted-background pixels, for all-foreground GT the number of predicted-foreground
  pixels; the sum is divided by ``N - 1 + eps``.
* **F-measure** with ``beta^2 = 0.3``: ``(1 + b2) P R / (b2 P + R)``, 0 where the
  numerator is 0; precision 0 when nothing is predicted, recall 0 when the GT is empty.

The per-image values are averaged with equal weight per image.

CLI::

    python -m fusionsam_jax.metrics.sod --pred_dir P --gt_dir G [--json out.json]
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from fusionsam_jax.metrics.miou import matched_png_names, prediction_dir

__all__ = [
    "EPS",
    "prepare",
    "mae",
    "s_measure",
    "adaptive_threshold",
    "e_measure",
    "e_measure_curve",
    "f_measure",
    "f_measure_curve",
    "SODMetrics",
    "load_grey_png",
    "evaluate_sod_dirs",
    "main",
]

EPS = float(np.spacing(1))  # MATLAB's eps, as the toolboxes use
NUM_THRESHOLDS = 256
RESULT_KEYS = ("Sm", "MAE", "adpEm", "meanEm", "maxEm", "adpFm", "meanFm", "maxFm")


# ----------------------------------------------------------------------------- inputs


def prepare(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """uint8 grey prediction and GT -> (float64 prediction in [0, 1], boolean GT)."""
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  if pred.shape != gt.shape or pred.ndim != 2:
    raise ValueError(f"prediction {pred.shape} and GT {gt.shape} must be equal 2-D shapes")
  gt_bool = gt > 128
  p = pred / 255  # float64 for integer input
  lo, hi = p.min(), p.max()
  if hi != lo:
    p = (p - lo) / (hi - lo)
  return p, gt_bool


def _check_normalized(pred: np.ndarray, gt: np.ndarray):
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  if pred.shape != gt.shape or pred.ndim != 2:
    raise ValueError(f"prediction {pred.shape} and GT {gt.shape} must be equal 2-D shapes")
  if pred.dtype not in (np.float32, np.float64):
    raise ValueError(f"normalized prediction must be float32/float64, got {pred.dtype}")
  if pred.size and not (pred.min() >= 0 and pred.max() <= 1):
    raise ValueError("normalized prediction must lie in [0, 1]")
  if gt.dtype != np.bool_:
    raise ValueError(f"normalized GT must be boolean, got {gt.dtype}")
  return pred, gt


def _inputs(pred, gt, normalize):
  return prepare(pred, gt) if normalize else _check_normalized(pred, gt)


# ----------------------------------------------------------------------------- MAE, S


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
  """Mean absolute error of a [0, 1] prediction against a boolean GT."""
  return float(np.mean(np.abs(pred - gt)))


def _s_object_part(x: np.ndarray) -> float:
  mu = x.mean()
  sd = x.std(ddof=1) if x.size > 1 else 0.0
  return 2.0 * mu / (mu * mu + 1.0 + sd + EPS)


def _block_ssim(p: np.ndarray, g: np.ndarray) -> float:
  n = p.size
  mp, mg = p.mean(), g.mean()
  dp, dg = p - mp, g - mg
  vp = np.sum(dp * dp) / (n - 1 + EPS)
  vg = np.sum(dg * dg) / (n - 1 + EPS)
  cov = np.sum(dp * dg) / (n - 1 + EPS)
  num = 4.0 * mp * mg * cov
  den = (mp * mp + mg * mg) * (vp + vg)
  if num != 0:
    return num / (den + EPS)
  return 1.0 if den == 0 else 0.0


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5) -> float:
  """Structure measure of a [0, 1] prediction against a boolean GT."""
  fg_ratio = gt.mean()
  if fg_ratio == 0:
    return float(1.0 - pred.mean())
  if fg_ratio == 1:
    return float(pred.mean())
# object-aware part
  s_obj = (fg_ratio * _s_object_part(pred[gt])
           + (1.0 - fg_ratio) * _s_object_part(1.0 - pred[~gt]))
  # region-aware part: split at the GT centroid (1-based "end" indices as in MATLAB)
  h, w = gt.shape
  rows, cols = np.nonzero(gt)
  cy = int(np.round(rows.mean())) + 1
  cx = int(np.round(cols.mean())) + 1
  area = h * w
  w_lt = cy * cx / area
  w_rt = cy * (w - cx) / area
  w_lb = (h - cy) * cx / area
  w_rb = 1.0 - w_lt - w_rt - w_lb
  s_reg = 0.0
  for weight, rs, cs in ((w_lt, slice(0, cy), slice(0, cx)),
                         (w_rt, slice(0, cy), slice(cx, w)),
                         (w_lb, slice(cy, h), slice(0, cx)),
                         (w_rb, slice(cy, h), slice(cx, w))):
    block = pred[rs, cs]
    if block.size:
      s_reg += weight * _block_ssim(block, gt[rs, cs])
  return float(max(0.0, alpha * s_obj + (1.0 - alpha) * s_reg))


# ----------------------------------------------------------------------------- E, F


def adaptive_threshold(pred: np.ndarray) -> float:
  """``min(2 * mean(pred), 1)``."""
  return float(min(2.0 * pred.mean(), 1.0))


def _em_from_counts(tp, fp, num_fg, n):
  """E-measure from the counts of a binarised prediction (vectorised over thresholds).

  tp / fp: predicted-foreground pixels on GT foreground / background; num_fg: GT
  foreground pixels; n: all pixels.
  """
  tp = np.asarray(tp, np.float64)
  fp = np.asarray(fp, np.float64)
  pred_fg = tp + fp
  pred_bg = n - pred_fg
  if num_fg == 0:
    total = pred_bg
  elif num_fg == n:
    total = pred_fg
  else:
    fn = num_fg - tp
    tn = pred_bg - fn
    mean_pred = pred_fg / n
    mean_gt = num_fg / n
    total = np.zeros_like(tp)
    # (bin. prediction value, GT value, pixel count) of the four pixel kinds
    for p_val, g_val, count in ((1.0, 1.0, tp), (1.0, 0.0, fp), (0.0, 1.0, fn),
                                (0.0, 0.0, tn)):
      a = p_val - mean_pred
      b = g_val - mean_gt
      align = 2.0 * a * b / (a * a + b * b + EPS)
      total = total + (align + 1.0) ** 2 / 4.0 * count
  return total / (n - 1 + EPS)


def _fm_from_counts(tp, fp, num_fg, beta2):
  tp = np.asarray(tp, np.float64)
  pred_fg = tp + np.asarray(fp, np.float64)
  precision = np.divide(tp, pred_fg, out=np.zeros_like(tp), where=pred_fg > 0)
  recall = tp / num_fg if num_fg > 0 else np.zeros_like(tp)
  num = (1.0 + beta2) * precision * recall
  den = beta2 * precision + recall
  fm = np.divide(num, den, out=np.zeros_like(tp), where=num != 0)
  return fm, precision, recall


def _threshold_counts(pred, gt):
  """tp(t), fp(t) for t = 0..255 on q = trunc(pred * 255) >= t (ascending t)."""
  q = (pred * 255).astype(np.uint8)
  fg_hist = np.bincount(q[gt], minlength=NUM_THRESHOLDS)
  bg_hist = np.bincount(q[~gt], minlength=NUM_THRESHOLDS)
  tp = np.cumsum(fg_hist[::-1])[::-1]  # number of fg pixels with q >= t
  fp = np.cumsum(bg_hist[::-1])[::-1]
  return tp, fp


def _binary_counts(pred, gt, threshold):
  b = pred >= threshold
  return np.count_nonzero(b & gt), np.count_nonzero(b & ~gt)


def e_measure(pred: np.ndarray, gt: np.ndarray, threshold: float | None = None) -> float:
  """E-measure of ``pred >= threshold`` (default: the adaptive threshold)."""
  t = adaptive_threshold(pred) if threshold is None else threshold
  tp, fp = _binary_counts(pred, gt, t)
  return float(_em_from_counts(tp, fp, np.count_nonzero(gt), gt.size))


def e_measure_curve(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """E-measure at the 256 thresholds ``q >= t``, t ascending; ``(256,)`` float64."""
  tp, fp = _threshold_counts(pred, gt)
  return _em_from_counts(tp, fp, np.count_nonzero(gt), gt.size)


def f_measure(pred: np.ndarray, gt: np.ndarray, threshold: float | None = None,
              beta2: float = 0.3) -> float:
  """F-measure of ``pred >= threshold`` (default: the adaptive threshold)."""
  t = adaptive_threshold(pred) if threshold is None else threshold
  tp, fp = _binary_counts(pred, gt, t)
  return float(_fm_from_counts(tp, fp, np.count_nonzero(gt), beta2)[0])


def f_measure_curve(pred: np.ndarray, gt: np.ndarray, beta2: float = 0.3):
  """(F-measure, precision, recall) at the 256 thresholds, t ascending; each ``(256,)``."""
  tp, fp = _threshold_counts(pred, gt)
  return _fm_from_counts(tp, fp, np.count_nonzero(gt), beta2)


# ----------------------------------------------------------------------------- accumulator


class SODMetrics:
  """Accumulates S-measure, MAE, E-measure and F-measure over images.

  ``update(pred, gt)`` takes uint8 grey images (normalised as described in the module
  docstring) or, with ``normalize=False``, a float prediction in [0, 1] and a boolean GT.
  ``results()`` returns ``Sm, MAE, adpEm, meanEm, maxEm, adpFm, meanFm, maxFm`` (floats)
  and, under ``"curves"``, the image-averaged ``em``, ``fm``, ``precision``, ``recall``
  curves indexed by ascending threshold ``t = 0..255``.
  """

  def __init__(self, alpha: float = 0.5, beta2: float = 0.3):
    self.alpha = float(alpha)
    self.beta2 = float(beta2)
    self.reset()

  def reset(self) -> None:
    self.count = 0
    self._sm = 0.0
    self._mae = 0.0
    self._adp_em = 0.0
    self._adp_fm = 0.0
    self._em = np.zeros(NUM_THRESHOLDS)
    self._fm = np.zeros(NUM_THRESHOLDS)
    self._p = np.zeros(NUM_THRESHOLDS)
    self._r = np.zeros(NUM_THRESHOLDS)

  def update(self, pred, gt, normalize: bool = True) -> dict:
    """Adds one image; returns its own scores (adaptive E/F and S, MAE)."""
    pred, gt = _inputs(pred, gt, normalize)
    num_fg, n = np.count_nonzero(gt), gt.size
    sm = s_measure(pred, gt, self.alpha)
    err = mae(pred, gt)
    t = adaptive_threshold(pred)
    tp, fp = _binary_counts(pred, gt, t)
    adp_em = float(_em_from_counts(tp, fp, num_fg, n))
    adp_fm = float(_fm_from_counts(tp, fp, num_fg, self.beta2)[0])
    tps, fps = _threshold_counts(pred, gt)
    em = _em_from_counts(tps, fps, num_fg, n)
    fm, p, r = _fm_from_counts(tps, fps, num_fg, self.beta2)
    self.count += 1
    self._sm += sm
    self._mae += err
    self._adp_em += adp_em
    self._adp_fm += adp_fm
    self._em += em
    self._fm += fm
    self._p += p
    self._r += r
    return {"Sm": sm, "MAE": err, "adpEm": adp_em, "adpFm": adp_fm}

  def results(self, curves: bool = True) -> dict:
    if self.count == 0:
      raise ValueError("no images were added")
    k = self.count
    em, fm = self._em / k, self._fm / k
    out = {
        "Sm": self._sm / k,
        "MAE": self._mae / k,
        "adpEm": self._adp_em / k,
        "meanEm": float(em.mean()),
        "maxEm": float(em.max()),
        "adpFm": self._adp_fm / k,
        "meanFm": float(fm.mean()),
        "maxFm": float(fm.max()),
        "num_images": k,
    }
    if curves:
      out["curves"] = {"em": em, "fm": fm, "precision": self._p / k,
                       "recall": self._r / k}
    return out


# ----------------------------------------------------------------------------- files / CLI


def load_grey_png(path) -> np.ndarray:
  """Reads an image as uint8 grey ``(H, W)``.

  Grey ("L") images are read as they are; bilevel, palette and colour images are
  converted with Pillow's ``convert("L")`` (ITU-R 601-2 luma). 16-bit and float images
  are refused. (OpenCV's ``IMREAD_GRAYSCALE``, used by many SOD scripts, may differ by
  one grey level on colour inputs; grey inputs are identical.)
  """

  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(f"{path}: image mode {im.mode!r} is not 8-bit; "
                         "save saliency maps as 8-bit grey PNG")
      if im.mode != "L":
        im = im.convert("L")
      return np.asarray(im, np.uint8).copy()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such image") from None
  except OSError as e:
    raise ValueError(f"{path}: cannot read as an image ({e})") from None


def evaluate_sod_dirs(pred_dir, gt_dir, alpha: float = 0.5, beta2: float = 0.3) -> SODMetrics:
  """Accumulates :class:`SODMetrics` over PNG folders matched by filename.

  No resizing: a prediction whose size differs from its GT raises ``ValueError``.
  """
  acc = SODMetrics(alpha=alpha, beta2=beta2)
  for name in matched_png_names(pred_dir, gt_dir):
    pp = os.path.join(os.fspath(pred_dir), name)
    gp = os.path.join(os.fspath(gt_dir), name)
    pred, gt = load_grey_png(pp), load_grey_png(gp)
    if pred.shape != gt.shape:
      raise ValueError(f"{pp}: prediction size {pred.shape[1]}x{pred.shape[0]} (WxH) "
                       f"!= ground truth {gp} size {gt.shape[1]}x{gt.shape[0]}")
    acc.update(pred, gt)
  return acc


if __name__ == "__main__":   # python -m fusionsam_jax.metrics.sod
  from fusionsam_jax.cli import driver, sod
  driver.main(sod)
