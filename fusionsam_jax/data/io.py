"""Image files: decoding with checks, grey-channel reduction, deterministic PNG writing.

Every problem with an input file raises a :class:`DatasetError` subclass whose message names
the file and says what was expected.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
from PIL import Image, ImageOps

# Image formats read by the builders (PNG is what the official releases use).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

#: How images that should be grey but are stored with colour channels are handled:
#: "strict" reduces them to one channel only when all colour channels are equal (else error);
#: "luma" converts any colour image with ITU-R 601-2 luma (PIL's "L" conversion).
GREY_POLICIES = ("strict", "luma")


class DatasetError(ValueError):
  """A dataset input is missing or malformed. ``path`` names the offending file or folder."""

  def __init__(self, path, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


class LayoutError(DatasetError):
  """The source folder does not have the expected layout (missing folder or list file)."""


class MissingFileError(DatasetError, FileNotFoundError):
  """A file that a sample needs (one of its modalities or its label) does not exist."""


class CorruptImageError(DatasetError):
  """An image file cannot be decoded (truncated, not an image, ...)."""


class ChannelError(DatasetError):
  """An image has the wrong number of channels or the wrong bit depth."""


class SizeMismatchError(DatasetError):
  """The modalities / label of one sample do not have the same height and width."""


class LabelRangeError(DatasetError):
  """A label map holds ids outside ``[0, num_classes)`` that are not the ignore index."""


class SplitListError(DatasetError):
  """A split list has an empty or duplicated entry, or splits overlap."""


def read_image(path, *, palette_indices: bool = False) -> np.ndarray:
  """Decodes an 8-bit image into uint8 ``(H, W, C)``.

  Args:
    path: image file.
    palette_indices: for palette ("P") images return the indices as one channel (label maps);
      otherwise palette images are expanded to RGB(A).

  Raises:
    MissingFileError, CorruptImageError, ChannelError (bit depth other than 8).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    if os.path.islink(path):
      try:
        os.stat(path)
      except OSError as e:
        raise CorruptImageError(path, f"a symbolic link that cannot be followed "
                                      f"({e.strerror})") from None
    raise MissingFileError(path, "file does not exist")
  depth = png_bit_depth(path)
  if depth is not None and depth > 8:
    raise ChannelError(path, f"{depth}-bit PNG: expected an 8-bit grey, RGB or RGBA image "
                             "(16-bit images are not accepted: PIL would drop their low byte)")
  try:
    with Image.open(path) as img:
      img.load()
      # A camera's EXIF orientation (a phone JPEG stored sideways) is applied, as viewers
      # do: otherwise it would be misregistered with its other modalities.
      img = ImageOps.exif_transpose(img)
      mode = img.mode
      if mode == "1":
        img = img.convert("L")  # bilevel masks -> {0, 255}
      elif mode == "P" and not palette_indices:
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
      elif mode not in ("L", "P", "LA", "RGB", "RGBA"):
        raise ChannelError(path, f"image mode {mode!r} is not supported: expected an "
                                 "8-bit grey, RGB or RGBA image (16-bit and float "
                                 "images are not)")
      arr = np.asarray(img)
  except DatasetError:
    raise
  except Image.DecompressionBombError as e:
    raise CorruptImageError(path, f"refused: {e}".rstrip(".") + " (a decompression bomb, or "
                                  "raise PIL.Image.MAX_IMAGE_PIXELS)") from None
  except (OSError, SyntaxError, ValueError, zlib.error) as e:
    raise CorruptImageError(path, f"cannot decode image ({type(e).__name__}: {e})") from e
  if arr.dtype != np.uint8:
    raise ChannelError(path, f"expected 8-bit pixels, got {arr.dtype}")
  if arr.ndim == 2:
    arr = arr[:, :, None]
  return arr


def png_bit_depth(path) -> int | None:
  """The bit depth per sample in a PNG's IHDR chunk (1, 2, 4, 8 or 16); None for other files.
  PIL decodes 16-bit RGB(A) PNGs as 8-bit RGB(A) without a word, so this is read off the
  header."""
  try:
    with open(path, "rb") as f:
      head = f.read(26)
  except OSError:
    return None
  if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    return None
  return head[24]


def to_grey(arr: np.ndarray, path, policy: str = "strict") -> np.ndarray:
  """Reduces an image that should be grey to ``(H, W, 1)``.

  One channel is kept as it is. Grey stored as RGB (or RGBA / LA with an opaque alpha) is
  reduced to its first channel when all colour channels are equal. Colour images raise
  :class:`ChannelError` under policy "strict" and are converted to ITU-R 601-2 luma
  (``(299 R + 587 G + 114 B) / 1000``, PIL's rounding) under policy "luma".
  """
  if policy not in GREY_POLICIES:
    raise ValueError(f"unknown grey policy {policy!r}: expected one of {GREY_POLICIES}")
  c = arr.shape[-1]
  if c == 1:
    return arr
  if c in (2, 4):
    if not np.all(arr[..., -1] == 255):
      raise ChannelError(path, f"expected a grey image, got {c} channels with a transparent "
                               "alpha channel")
    arr = arr[..., :-1]
    c -= 1
    if c == 1:
      return arr
  if c != 3:
    raise ChannelError(path, f"expected a grey image (1 channel), got {arr.shape[-1]} channels")
  r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
  if np.array_equal(r, g) and np.array_equal(r, b):
    return np.ascontiguousarray(arr[..., :1])
  if policy == "strict":
    raise ChannelError(path, "expected a grey image (thermal / depth): it has 3 channels that "
                             "differ (a colour image)")
  luma = (r.astype(np.uint32) * 19595 + g.astype(np.uint32) * 38470
          + b.astype(np.uint32) * 7471 + 0x8000) >> 16
  return luma.astype(np.uint8)[..., None]


def to_rgb(arr: np.ndarray, path) -> np.ndarray:
  """Checks a visible image is RGB ``(H, W, 3)`` (an opaque alpha channel is dropped)."""
  c = arr.shape[-1]
  if c == 4 and np.all(arr[..., 3] == 255):
    return np.ascontiguousarray(arr[..., :3])
  if c != 3:
    raise ChannelError(path, f"expected an RGB image (3 channels), got {c} channel(s)")
  return arr


def write_png(path, arr: np.ndarray) -> None:
  """Writes uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` as PNG.

  The output is byte-identical for identical input (no timestamps or text chunks).
  """
  arr = np.asarray(arr)
  if arr.dtype != np.uint8:
    raise ValueError(f"{path}: expected uint8 pixels, got {arr.dtype}")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
    raise ValueError(f"{path}: cannot write an array of shape {arr.shape} as PNG")
# fromarray infers L / RGB / RGBA from the shape of a uint8 array.
  Image.fromarray(np.ascontiguousarray(arr)).save(os.fspath(path), format="PNG",
                                                  compress_level=6)
