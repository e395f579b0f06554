"""Losses: segmentation (CE + Dice), fusion (SwinFusion style), VQ/VQGAN pieces.

Pure functions on ``jnp`` arrays (channels-last), jittable, no modules or state. Each loss
returns ``(total, terms)`` where ``terms`` is a dict of scalar arrays for logging.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "segmentation_loss",
    "fusion_loss",
    "DEFAULT_FUSION_WEIGHTS",
    "rgb_to_y",
    "to_grey",
    "sobel",
    "gradient_magnitude",
    "codebook_usage",
    "reconstruction_loss",
    "REC_LOSSES",
    "disc_start_step",
    "disc_lr_schedule",
    "hinge_d_loss",
    "generator_adv_loss",
    "adaptive_adv_weight",
    "adopt_weight",
]


# ----------------------------------------------------------------------------- segmentation


def segmentation_loss(logits, labels, ignore_index: int = 255, dice_weight: float = 1.0,
                      dice_smooth: float = 1.0):
  """Cross-entropy + soft multi-class Dice for semantic segmentation (f_s, docs/design.md).

  Args:
    logits: ``(B, H, W, C)`` unnormalised class scores (computed in float32).
    labels: ``(B, H, W)`` int class ids; ``ignore_index`` pixels are excluded. Values
      outside ``[0, C)`` are excluded as well (JAX cannot raise on data).
    ignore_index: label value to ignore (default 255).
    dice_weight: weight of the Dice term; ``total = ce + dice_weight * dice``.
    dice_smooth: additive smoothing ``s`` of the Dice ratio.

  Terms:
    ``ce``: mean over valid pixels of ``-log softmax(logits)[label]`` (0 if none valid).
    ``dice``: ``1 - mean_c (2 I_c + s) / (P_c + Y_c + s)``, where over the valid pixels of
      the whole batch ``I_c = sum p_c y_c``, ``P_c = sum p_c``, ``Y_c = sum y_c``
      (``p`` = softmax, ``y`` = one-hot label), averaged over all C classes. A class absent
      from the batch's labels scores ``s / (P_c + s)``: predicting it is penalised, not
      predicting it costs nothing. With no valid pixel the Dice term is 0.
    ``num_valid``: number of valid pixels (float).

  Returns:
    ``(total, {"ce", "dice", "num_valid"})``.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if logits.ndim != 4 or labels.shape != logits.shape[:3]:
    raise ValueError(f"expected logits (B,H,W,C) and labels (B,H,W), got "
                     f"{logits.shape} and {labels.shape}")
  num_classes = logits.shape[-1]
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  num_valid = jnp.sum(valid)
  ce = jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(num_valid, 1).astype(jnp.float32)

  vmask = valid[..., None]
  probs = jnp.where(vmask, jnp.exp(logp), 0.0)
  onehot = jnp.where(vmask, jax.nn.one_hot(safe, num_classes, dtype=jnp.float32), 0.0)
  axes = (0, 1, 2)
  inter = jnp.sum(probs * onehot, axis=axes)
  p_sum = jnp.sum(probs, axis=axes)
  y_sum = jnp.sum(onehot, axis=axes)
  dice_c = (2.0 * inter + dice_smooth) / (p_sum + y_sum + dice_smooth)
  dice = 1.0 - jnp.mean(dice_c)
  total = ce + dice_weight * dice
  return total, {"ce": ce, "dice": dice, "num_valid": num_valid.astype(jnp.float32)}


# ----------------------------------------------------------------------------- image helpers


def rgb_to_y(x):
  """Luma of RGB in [0, 1], ITU-R BT.601 full range: ``0.299 R + 0.587 G + 0.114 B``.

  ``(..., 3) -> (..., 1)``.
  """
  x = jnp.asarray(x)
  if x.shape[-1] != 3:
    raise ValueError(f"rgb_to_y expects 3 channels last, got shape {x.shape}")
  w = jnp.asarray([0.299, 0.587, 0.114], x.dtype)
  return jnp.sum(x * w, axis=-1, keepdims=True)


def to_grey(x):
  """1 channel: unchanged; 3 channels: :func:`rgb_to_y`; otherwise ``ValueError``."""
  x = jnp.asarray(x)
  if x.shape[-1] == 1:
    return x
  if x.shape[-1] == 3:
    return rgb_to_y(x)
  raise ValueError(f"cannot make a grey image from {x.shape[-1]} channels (shape {x.shape})")


def sobel(x):
  """Sobel derivatives of ``(..., H, W, C)`` images, per channel (depthwise 3x3).

  'SAME' output size with edge (replicate) padding. Cross-correlation kernels::

      gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]    (positive where x grows rightwards)
      gy = gx^T                                    (positive where x grows downwards)

  Computed as shifted differences (the same depthwise 3x3 stencil) so that it is exact
  in float32 on every backend (no TF32 convolution). Returns ``(gx, gy)``.
  """
  x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(f"sobel expects (..., H, W, C), got shape {x.shape}")
  pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  p = jnp.pad(x, pad, mode="edge")
  h, w = x.shape[-3], x.shape[-2]

  def at(dy, dx):  # p shifted so that at(0, 0) == x
    return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w, :]

  gx = (at(-1, 1) - at(-1, -1)) + 2.0 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
  gy = (at(1, -1) - at(-1, -1)) + 2.0 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
  return gx, gy


def gradient_magnitude(x):
  """``|gx| + |gy|`` of :func:`sobel` (the L1 gradient magnitude SwinFusion uses)."""
  gx, gy = sobel(x)
  return jnp.abs(gx) + jnp.abs(gy)


# ----------------------------------------------------------------------------- fusion


DEFAULT_FUSION_WEIGHTS = {"ssim": 10.0, "intensity": 20.0, "gradient": 20.0}


def fusion_loss(fused, sources: Sequence, weights: Mapping[str, float] | None = None, *,
                ssim_weighting: str = "equal", ssim_max_val: float = 1.0):
  """SwinFusion-style fusion loss of a fused RGB image against its source images.

  Everything is computed on grey images: the fused image is converted to its BT.601 luma
  ``Y_f`` (:func:`rgb_to_y`); each source ``S_i`` to ``G_i`` (1 channel as is, RGB to its
  luma). With ``G_max = max_i G_i`` and ``∇ = |gx| + |gy|`` (:func:`gradient_magnitude`,
  Sobel with edge padding):

  * ``ssim = sum_i a_i (1 - SSIM(Y_f, G_i))`` with ``dm_pix.ssim`` (11x11 Gaussian window,
    sigma 1.5, k1 0.01, k2 0.03, ``max_val`` 1; mean of the 'valid' SSIM map, i.e. the
    image less a 5-pixel border), averaged over the batch. ``a_i = 1/n`` for
    ``ssim_weighting="equal"`` (default); ``"gradient"`` uses
    ``a_i = mean(∇G_i) / sum_j mean(∇G_j)`` over the batch (as in the SwinFusion code),
    under stop-gradient.
  * ``intensity = mean |Y_f - G_max|``
  * ``gradient = mean |∇Y_f - max_i ∇G_i|``

  ``total = w_ssim * ssim + w_intensity * intensity + w_gradient * gradient``; default
  weights ``{"ssim": 10, "intensity": 20, "gradient": 20}`` (SwinFusion's VIF setting; its
  extra total-variation term is not used). Keys missing from ``weights`` take the default.
  Images must be at least 11 x 11.

  Args:
    fused: ``(B, H, W, 3)`` in [0, 1].
    sources: list of ``(B, H, W, C_i)`` in [0, 1], ``C_i`` in {1, 3}.

  Returns:
    ``(total, {"ssim", "intensity", "gradient", "ssim_src0", "ssim_src1", ...})`` — the
    unweighted terms, and the SSIM of ``Y_f`` with each source.
  """

  fused = jnp.asarray(fused, jnp.float32)
  if fused.ndim != 4 or fused.shape[-1] != 3:
    raise ValueError(f"fused must be (B, H, W, 3), got {fused.shape}")
  if len(sources) == 0:
    raise ValueError("fusion_loss needs at least one source image")
  w = dict(DEFAULT_FUSION_WEIGHTS)
  if weights is not None:
    unknown = set(weights) - set(w)
    if unknown:
      raise ValueError(f"unknown fusion-loss weight keys {sorted(unknown)}; "
                       f"expected {sorted(w)}")
    w.update({k: float(v) for k, v in weights.items()})
  yf = rgb_to_y(fused)
  greys = []
  for i, s in enumerate(sources):
    s = jnp.asarray(s, jnp.float32)
    if s.shape[:3] != fused.shape[:3]:
      raise ValueError(f"source {i} has shape {s.shape}; expected (B, H, W) "
                       f"= {fused.shape[:3]}")
    greys.append(to_grey(s))

  grads = [gradient_magnitude(g) for g in greys]
  n = len(greys)
  if ssim_weighting == "equal":
    coef = [1.0 / n] * n
  elif ssim_weighting == "gradient":
    means = jax.lax.stop_gradient(jnp.stack([jnp.mean(g) for g in grads]))
    tot = jnp.sum(means)
    coef_arr = jnp.where(tot > 0, means / jnp.where(tot > 0, tot, 1.0), 1.0 / n)
    coef = [coef_arr[i] for i in range(n)]
  else:
    raise ValueError(f"ssim_weighting must be 'equal' or 'gradient', got {ssim_weighting!r}")

  terms = {}
  ssim_loss = 0.0
  for i, g in enumerate(greys):
    s = jnp.mean(dm_pix.ssim(yf, g, max_val=ssim_max_val))
    terms[f"ssim_src{i}"] = s
    ssim_loss = ssim_loss + coef[i] * (1.0 - s)
  g_max = greys[0]
  grad_max = grads[0]
  for g, gr in zip(greys[1:], grads[1:]):
    g_max = jnp.maximum(g_max, g)
    grad_max = jnp.maximum(grad_max, gr)
  intensity = jnp.mean(jnp.abs(yf - g_max))
  gradient = jnp.mean(jnp.abs(gradient_magnitude(yf) - grad_max))
  total = w["ssim"] * ssim_loss + w["intensity"] * intensity + w["gradient"] * gradient
  terms.update(ssim=jnp.asarray(ssim_loss, jnp.float32), intensity=intensity,
               gradient=gradient)
  return total, terms


# ----------------------------------------------------------------------------- VQ / VQGAN


def codebook_usage(indices, codebook_size: int):
  """Codebook usage statistics of a batch of code indices (jittable, size static).

  Returns a dict: ``perplexity = exp(-sum_k p_k log p_k)`` with ``p_k`` the frequency of
  code k (``K`` for uniform use, 1 when a single code is used), ``dead_codes`` (number of
  codes never used, int32), ``dead_fraction`` (= dead_codes / K), ``counts`` ``(K,)``.
  Indices outside ``[0, K)`` are not counted.
  """
  k = int(codebook_size)
  idx = jnp.asarray(indices).reshape(-1).astype(jnp.int32)
  ok = (idx >= 0) & (idx < k)
  # A one-hot sum rather than a scatter (segment_sum): scatter atomics serialise when the
  # codes collapse onto a few entries; float32 counts are exact below 2**24 per batch.
  counts = jnp.sum(jax.nn.one_hot(jnp.where(ok, idx, -1), k, dtype=jnp.float32),
                   axis=0).astype(jnp.int32)
  return usage_from_counts(counts)


def usage_from_counts(counts):
  """`codebook_usage`'s statistics from per-code use counts ``(K,)`` (e.g. summed over
  many batches). numpy counts are summarised in numpy (no device programs), others in
  jax.numpy."""
  xp = np if isinstance(counts, np.ndarray) else jnp
  k = counts.shape[0]
  total = xp.maximum(xp.sum(counts), 1)
  p = counts.astype(xp.float32) / total.astype(xp.float32)
  entropy = -xp.sum(xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0))
  dead = xp.sum(counts == 0).astype(xp.int32)
  return {"perplexity": xp.exp(entropy), "dead_codes": dead,
          "dead_fraction": dead.astype(xp.float32) / k, "counts": counts}


REC_LOSSES = ("l2", "l1")


def reconstruction_loss(x, recon, kind: str = "l2"):
  """Eq. 5, the tokenizer's reconstruction term, averaged over all elements.

  ``"l2"``: ``mean (x - x̂)²``, the squared L2 norm the paper writes (‖I - Î‖²₂) divided
  by the number of elements; ``"l1"``: ``mean |x - x̂|`` (taming-transformers' VQGAN
  code). x, recon: ``(B, H, W, C)`` (any equal shapes).
  """
  if kind not in REC_LOSSES:
    raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {kind!r}")
  d = jnp.asarray(x, jnp.float32) - jnp.asarray(recon, jnp.float32)
  return jnp.mean(jnp.square(d)) if kind == "l2" else jnp.mean(jnp.abs(d))


def disc_start_step(disc_start, num_steps, disc_start_fraction: float = 0.5,
                    disc_weight: float = 1.0) -> int:
  """The step from which Eq. 8's discriminator trains (and the generator's adversarial term
  is on): ``disc_start`` if given (absolute), else ``int(disc_start_fraction * num_steps)``
  (0 if neither is known).

  Raises ValueError when the adversarial term is on (``disc_weight > 0``) but the start is
  at or past ``num_steps`` (> 0): the discriminator would never train. (The paper configs used
  to fix ``disc_start`` at half the 100-epoch schedule, 9 800 steps on MFNet, so a run with
  ``num_steps`` shortened on the command line never reached it: d_loss and its gradient
  were exactly 0 in every row.)
  """
  if disc_start is None:
    start = 0 if num_steps is None else int(float(disc_start_fraction) * int(num_steps))
  else:
    start = int(disc_start)
  # A stage of 0 steps trains nothing (it is skipped), so there is nothing to check.
  if (num_steps is not None and int(num_steps) > 0 and float(disc_weight) > 0
      and start >= int(num_steps)):
    raise ValueError(
        f"disc_start {start} >= num_steps {int(num_steps)}: the tokenizer's discriminator "
        "(Eq. 8) would never train. Leave disc_start unset (it is then "
        "disc_start_fraction x num_steps), set it below num_steps, or set disc_weight=0 "
        "to run without the adversarial term.")
  return start


def disc_lr_schedule(learning_rate: float, disc_start: int):
  """The discriminator optimizer's learning rate: 0 before ``disc_start``, then
  ``learning_rate`` (an optax schedule of the optimizer's update count = the train step).

  Before ``disc_start`` the discriminator's loss gradient is 0, but Adam with L2 weight
  decay still sees ``wd * param`` and, normalising it, moves every parameter by about the
  learning rate per step towards 0: over the paper schedule's 9 800 warm-up steps that
  erases the N(0, 0.02) init. A zero learning rate keeps D at its init until it trains.
  """
  lr, start = float(learning_rate), int(disc_start)

  def schedule(count):
    return jnp.where(jnp.asarray(count) < start, 0.0, lr).astype(jnp.float32)
  return schedule


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss: ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))``."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake):
  """Generator adversarial loss: ``-mean D(G(z))``."""
  return -jnp.mean(logits_fake)


def adaptive_adv_weight(nll_grad_norm, g_grad_norm, max: float = 1e4):  # noqa: A002
  """VQGAN's adaptive weight ``λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_adv|| + 1e-4)``.

  The inputs are the gradient norms with respect to the decoder's last layer; the result
  is clipped to ``[0, max]`` and stop-gradiented. Multiply by the discriminator weight
  and :func:`adopt_weight` yourself.
  """
  lam = jnp.asarray(nll_grad_norm, jnp.float32) / (jnp.asarray(g_grad_norm, jnp.float32)
                                                   + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, max))


def adopt_weight(weight, step, start_step):
  """``weight`` from ``start_step`` on, 0 before (``jnp.where``: works on traced steps)."""
  weight = jnp.asarray(weight, jnp.float32)
  return jnp.where(jnp.asarray(step) < start_step, jnp.zeros_like(weight), weight)
