"""grain input pipelines: training (shuffled, augmented, batched) and evaluation (every pixel).

Both take any random-access source (``__len__`` / ``__getitem__`` returning element dicts):
a prepared TFDS split (:func:`fusionsam_jax.data.sources.load_source`), an
:class:`~fusionsam_jax.data.sources.InMemorySource`, a list of generated elements, ...

Batches are dicts of numpy arrays with a leading batch dim: modality images uint8
``(B, H, W, C)``, ``label`` int32 ``(B, H, W)`` (255 = ignore), ``name`` str ``(B,)``;
eval batches add ``valid`` bool ``(B, H, W)``.

Iterators are ``grain.DataLoader`` iterators: ``it = iter(loader)``; ``state = it.get_state()``
(bytes); a fresh ``it2 = iter(loader)`` + ``it2.set_state(state)`` continues with exactly the
batches ``it`` would have produced (same loader arguments, worker count included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain.python as grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from fusionsam_jax.data.datasets import IGNORE_INDEX, MODALITY_CHANNELS

MODALITY_KEYS = tuple(MODALITY_CHANNELS)  # ("rgb", "thermal", "depth")
_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def process_shard_options(drop_remainder: bool = True) -> grain.ShardOptions:
  """Shards the source by JAX process (``jax.process_index()`` of ``jax.process_count()``)."""
  return grain.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                            drop_remainder=drop_remainder)


def _ensure_flags_parsed() -> None:
  """grain 0.2.x reads an absl flag when it starts worker processes and fails in scripts that
  do not run under ``absl.app`` (google/grain#1355). Mark unparsed flags as parsed (defaults),
  as grain's fix does; a later ``app.run`` / ``FLAGS(argv)`` still parses the command line."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def default_read_options(batch_size: int) -> grain.ReadOptions:
  """4 read threads (zlib / array_record release the GIL) and a prefetch of a few batches.

  grain's default (16 threads, 500 elements) holds ~0.75 GB of decoded MFNet pairs per
  process; this keeps memory small while reading stays ahead of augmentation.
  """
  return grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(16, 2 * batch_size))


def _as_str(name) -> str:
  if isinstance(name, np.ndarray):
    name = name.item()
  if isinstance(name, bytes):
    return name.decode("utf-8")
  return str(name)


class Standardize(grain.MapTransform):
  """Keeps the modalities, the label and the name; ``name`` becomes ``str``."""

  def __init__(self, modalities: Sequence[str] | None = None, label_dtype=np.int32):
    self.modalities = tuple(modalities) if modalities is not None else None
    self.label_dtype = np.dtype(label_dtype)

  def map(self, element):
    keys = self.modalities or tuple(k for k in MODALITY_KEYS if k in element)
    out = {}
    for k in keys:
      arr = np.asarray(element[k])
      if arr.ndim == 2:
        arr = arr[..., None]
      if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"element {_as_str(element.get('name', '?'))!r}: {k} must be "
                         f"uint8 (H, W, C), got {arr.dtype} {arr.shape}")
      out[k] = arr
    label = np.asarray(element["label"])
    if label.ndim == 3 and label.shape[-1] == 1:
      label = label[..., 0]
    out["label"] = label
    out["name"] = _as_str(element.get("name", ""))
    return out


def _resize_region(arr: np.ndarray, box, size, resample) -> np.ndarray:
  """Resamples ``box`` (x0, y0, x1, y1 in source pixels) of uint8 (H, W[, C]) to ``size``
  (w, h). Channels are resampled together (RGB) or one by one."""
  if arr.ndim == 3 and arr.shape[-1] == 1:
    out = Image.fromarray(arr[..., 0]).resize(size, resample, box=box)
    return np.asarray(out)[..., None]
  if arr.ndim == 2 or arr.shape[-1] in (3, 4):
    return np.asarray(Image.fromarray(arr).resize(size, resample, box=box))
  return np.stack([_resize_region(arr[..., c], box, size, resample)
                   for c in range(arr.shape[-1])], axis=-1)


def scale_crop_flip(element: dict, *, scale: float, crop_size: tuple[int, int],
                    offset: tuple[int, int], flip: bool, image_resample: str = "bilinear",
                    pad_value: int = 0, label_pad_value: int = IGNORE_INDEX) -> dict:
  """Deterministic geometric augmentation shared by every modality and the label.

  The element is scaled by ``scale`` (to ``round(H * scale) x round(W * scale)``), then the
  window of ``crop_size`` whose top-left corner is ``offset`` in the scaled image is taken;
  parts of the window outside the scaled image are padded (images ``pad_value``, label
  ``label_pad_value``). ``flip`` mirrors left-right. Images use ``image_resample``, the label
  nearest neighbour, with the same sampling geometry, so pixels stay aligned.
  """
  label = element["label"]
  h, w = label.shape[:2]
  ch, cw = crop_size
  sh, sw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  y0, x0 = offset
  iy0, ix0 = max(0, y0), max(0, x0)
  iy1, ix1 = min(sh, y0 + ch), min(sw, x0 + cw)
  out = {}
  keys = [k for k in element if k in MODALITY_KEYS] + ["label"]
  for k in keys:
    arr = element[k]
    is_label = k == "label"
    region = None
    if iy1 > iy0 and ix1 > ix0:
      if (sh, sw) == (h, w):
        region = arr[iy0:iy1, ix0:ix1]
      else:
        box = (ix0 * w / sw, iy0 * h / sh, ix1 * w / sw, iy1 * h / sh)
        resample = Image.NEAREST if is_label else _RESAMPLE[image_resample]
        region = _resize_region(arr, box, (ix1 - ix0, iy1 - iy0), resample)
    if region is not None and region.shape[:2] == (ch, cw):
      canvas = region  # the window lies inside the scaled image: no padding
    else:
      shape = (ch, cw) + tuple(arr.shape[2:])
      canvas = np.full(shape, label_pad_value if is_label else pad_value, arr.dtype)
      if region is not None:
        canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = region
    if flip:
      canvas = canvas[:, ::-1]
    out[k] = np.ascontiguousarray(canvas)
  for k, v in element.items():
    if k not in out:
      out[k] = v
  return out


class RandomScaleCropFlip(grain.RandomMapTransform):
  """Random scale in ``scale_range`` (uniform), random ``crop_size`` window (padded where the
  scaled image is smaller, label with 255), horizontal flip with probability ``flip_prob``;
  one draw per element, applied identically to every modality and the label."""

  def __init__(self, crop_size: tuple[int, int], scale_range=(0.5, 2.0), flip_prob=0.5,
               image_resample: str = "bilinear", label_dtype=np.int32):
    if image_resample not in _RESAMPLE:
      raise ValueError(f"image_resample={image_resample!r}: expected one of "
                       f"{tuple(_RESAMPLE)}")
    self.crop_size = (int(crop_size[0]), int(crop_size[1]))
    self.scale_range = (float(scale_range[0]), float(scale_range[1]))
    self.flip_prob = float(flip_prob)
    self.image_resample = image_resample
    self.label_dtype = np.dtype(label_dtype)

  def draw(self, height: int, width: int, rng: np.random.Generator) -> dict:
    """Draws the parameters of :func:`scale_crop_flip` for an image of this size."""
    ch, cw = self.crop_size
    lo, hi = self.scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else lo
    sh, sw = max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def offset(scaled, crop):  # a window inside the image, or the image inside the window
      if scaled >= crop:
        return int(rng.integers(0, scaled - crop + 1))
      return -int(rng.integers(0, crop - scaled + 1))

    y0, x0 = offset(sh, ch), offset(sw, cw)
    flip = bool(rng.random() < self.flip_prob)
    return {"scale": scale, "offset": (y0, x0), "flip": flip}

  def random_map(self, element, rng: np.random.Generator):
    h, w = element["label"].shape[:2]
    out = scale_crop_flip(element, crop_size=self.crop_size,
                          image_resample=self.image_resample, **self.draw(h, w, rng))
    out["label"] = out["label"].astype(self.label_dtype)
    return out


def train_loader(source, *, batch_size: int, crop_size: tuple[int, int],
                 scale_range: tuple[float, float] = (0.5, 2.0), flip_prob: float = 0.5,
                 seed: int = 0, num_epochs: int | None = None, worker_count: int = 0,
                 worker_buffer_size: int = 2, shard_options: grain.ShardOptions | None = None,
                 modalities: Sequence[str] | None = None, image_resample: str = "bilinear",
                 label_dtype=np.int32,
                 read_options: grain.ReadOptions | None = None) -> grain.DataLoader:
  """Training loader: per-epoch shuffle (seeded), augmentation, batches without remainder.

  Args:
    source: random-access source of elements.
    batch_size: per-process batch size.
    crop_size: (height, width) of every output image.
    scale_range: (min, max) of the random scale factor (uniform); (1, 1) for none.
    flip_prob: probability of a horizontal flip.
    seed: shuffle + augmentation seed (a 32-bit non-negative int). Epoch e is shuffled
      with a permutation derived from (seed, e); each record's augmentation draw from
      (seed, global position), so a pipeline is reproducible and resumable.
    num_epochs: None repeats forever.
    worker_count: worker processes (0 = in this process).
    shard_options: default shards by JAX process (:func:`process_shard_options`).
    modalities: modality keys to keep (default: all present in the element).
    image_resample: "bilinear" (default), "bicubic" or "nearest" for images; labels are
      always nearest-neighbour.
    read_options: grain read threads / prefetch (default :func:`default_read_options`).
  """
  shard_options = shard_options or process_shard_options(drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options,
                               shuffle=True, num_epochs=num_epochs, seed=int(seed))
  ops = [Standardize(modalities, label_dtype),
         RandomScaleCropFlip(crop_size, scale_range, flip_prob, image_resample, label_dtype),
         grain.Batch(batch_size=batch_size, drop_remainder=True)]
  if worker_count:
    _ensure_flags_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                          shard_options=shard_options,
                          read_options=read_options or default_read_options(batch_size))


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


class _PaddedSource(Sequence):
  """``source`` followed by placeholder elements up to ``length`` (marked not ``_real``):
  zero images and an all-255 label of the first element's size."""

  def __init__(self, source, length: int):
    self._source = source
    self._n = len(source)
    self._length = length
    self._dummy = None

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if index < self._n:
      return dict(self._source[index], _real=True)
    dummy = self._dummy
    if dummy is None:
        # Built completely before it is published: grain reads from several threads, and
        # a half-built placeholder (no label yet) was seen by another thread.
      first = self._source[0]
      dummy = {k: np.zeros_like(np.asarray(v)) for k, v in first.items()
               if k in MODALITY_KEYS}
      dummy["label"] = np.full_like(np.asarray(first["label"]), IGNORE_INDEX)
      dummy["name"] = ""
      dummy["_real"] = False
      self._dummy = dummy
    return dict(dummy)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


class PadForEval(grain.MapTransform):
  """Adds ``valid`` (True on real pixels) and pads to ``pad_to`` (if given)."""

  def __init__(self, pad_to: tuple[int, int] | None, label_dtype=np.int32):
    self.pad_to = pad_to
    self.label_dtype = np.dtype(label_dtype)

  def map(self, element):
    real = element.pop("_real")
    h, w = element["label"].shape[:2]
    element["valid"] = np.full((h, w), bool(real))
    element["label"] = element["label"].astype(self.label_dtype)
    if self.pad_to is not None:
      th, tw = self.pad_to
      if h > th or w > tw:
        raise ValueError(f"element {element['name']!r}: size {h}x{w} exceeds "
                         f"pad_to={th}x{tw}")
      element = pad_element(element, (th, tw))
    return element


def pad_element(element: dict, size: tuple[int, int]) -> dict:
  """Pads images (0), ``label`` (255) and ``valid`` (False) at the bottom / right to ``size``."""
  th, tw = size
  out = {}
  for k, v in element.items():
    if isinstance(v, np.ndarray) and v.ndim >= 2:
      h, w = v.shape[:2]
      fill = IGNORE_INDEX if k == "label" else (False if k == "valid" else 0)
      if (h, w) != (th, tw):
        pad = [(0, th - h), (0, tw - w)] + [(0, 0)] * (v.ndim - 2)
        v = np.pad(v, pad, constant_values=fill)
    out[k] = v
  return out


class PadBatch:
  """Batch function: pads the elements to the largest size in the batch, rounded up to
  ``multiple``, then stacks. (With ``pad_to`` every element already has that size.)"""

  def __init__(self, multiple: int = 1):
    self.multiple = int(multiple)

  def __call__(self, elements):
    th = _round_up(max(e["label"].shape[0] for e in elements), self.multiple)
    tw = _round_up(max(e["label"].shape[1] for e in elements), self.multiple)
    elements = [pad_element(e, (th, tw)) for e in elements]
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def eval_loader(source, *, batch_size: int, pad_to: tuple[int, int] | None = None,
                pad_multiple: int = 1, worker_count: int = 0, worker_buffer_size: int = 2,
                shard_count: int | None = None, shard_index: int | None = None,
                modalities: Sequence[str] | None = None, label_dtype=np.int32,
                read_options: grain.ReadOptions | None = None) -> grain.DataLoader:
  """Evaluation loader: full resolution, every example exactly once, in source order.

  Images are padded at the bottom / right to ``pad_to`` (height, width) when given (then
  every batch has that shape: one compilation), else to the batch's largest size rounded
  up to ``pad_multiple``. ``valid`` (B, H, W) is True exactly on real pixels (padding:
  False, label 255). The source is padded with placeholder examples (``valid`` all False,
  ``name`` "") to a multiple of ``batch_size * shard_count``, so every batch is full and
  every process (shard) gets the same number of batches; nothing is dropped.

  ``shard_count`` / ``shard_index`` default to the JAX process count / index; shard i gets
  a contiguous block of the (padded) source.
  """
  if shard_count is None or shard_index is None:
    shard_count, shard_index = jax.process_count(), jax.process_index()
  n = len(source)
  if n == 0:
    raise ValueError("eval_loader: the source is empty")
  per_round = batch_size * shard_count
  padded = _PaddedSource(source, _round_up(n, per_round))
  shard_options = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                     drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(padded), shard_options=shard_options,
                               shuffle=False, num_epochs=1)
  ops = [_KeepFlag(Standardize(modalities, label_dtype)), PadForEval(pad_to, label_dtype),
         grain.Batch(batch_size=batch_size, drop_remainder=False,
                     batch_fn=PadBatch(pad_multiple))]
  if worker_count:
    _ensure_flags_parsed()
  return grain.DataLoader(data_source=padded, sampler=sampler, operations=ops,
                          worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                          shard_options=shard_options,
                          read_options=read_options or default_read_options(batch_size))


class _KeepFlag(grain.MapTransform):
  """Runs ``Standardize`` but keeps the ``_real`` flag of padded sources."""

  def __init__(self, inner: Standardize):
    self.inner = inner

  def map(self, element):
    out = self.inner.map(element)
    out["_real"] = bool(element.get("_real", True))
    return out


def num_eval_batches(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches per process that :func:`eval_loader` yields."""
  return math.ceil(num_examples / (batch_size * shard_count))
