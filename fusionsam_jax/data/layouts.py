"""On-disk layouts of the official releases: listing samples per split, decoding and checking.

This module knows where each file of a sample lives and how to turn the files into an element
``{"rgb": (H, W, 3), "thermal": (H, W, 1), ["depth": (H, W, 1)], "label": (H, W), "name": str}``
(all uint8). The TFDS builders and the validation pass of ``prepare`` both use it, so a
dataset is written only from inputs that passed exactly the checks the writer applies.

Layouts (``root`` is the manual-download folder):

* MFNet: ``images/<name>.png`` (4 channels: RGB + thermal), ``labels/<name>.png`` (ids 0-8),
  split lists ``train.txt val.txt test.txt`` (+ ``test_day.txt test_night.txt``; when absent
  they are derived from the name suffix ``D`` / ``N`` of the test names).
* FMB: ``{train,test}/{Visible,Infrared,Label}/<name>.png`` (Label ids 0-14, 255 = ignore;
  a ``color`` folder, if present, is ignored). ``val`` = the last 10 % of the sorted official
  train names, ``train`` = the rest.
* VDT-2048: ``{Train,Test}/{V,D,T,GT}/<name>.png``; label = ``GT > 127`` as {0, 1}. ``val`` =
  the last 10 % of the sorted official Train names, ``train`` = the rest.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from fusionsam_jax.data import info as info_lib
from fusionsam_jax.data.io import (IMAGE_SUFFIXES, ChannelError, DatasetError, LabelRangeError,
                                   LayoutError, MissingFileError, SizeMismatchError,
                                   SplitListError, read_image, to_grey, to_rgb)

#: Fraction of the official train set (sorted names, the last ones) held out as ``val``
#: for layouts without an official validation split (FMB, VDT-2048).
VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sample on disk: its name and the file behind each role."""

  name: str
  files: tuple[tuple[str, str], ...]  # (role, path) pairs

  def file(self, role: str) -> str:
    return dict(self.files)[role]


def carve_val(names: list[str], fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
  """Splits sorted ``names`` into (train, val): val is the last ``max(1, round(f * n))``.

  With fewer than 2 names val is empty. Deterministic: depends only on the set of names.
  """
  names = sorted(names)
  if len(names) < 2 or fraction <= 0:
    return names, []
  n_val = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
  return names[:-n_val], names[-n_val:]


def _check_sizes(arrays: dict[str, tuple[str, np.ndarray]]) -> None:
  """Raises SizeMismatchError unless all arrays share (H, W). ``arrays``: role -> (path, arr)."""
  items = list(arrays.values())
  ref_path, ref = items[0]
  for path, arr in items[1:]:
    if arr.shape[:2] != ref.shape[:2]:
      raise SizeMismatchError(
          path, f"size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from "
                f"{ref.shape[1]}x{ref.shape[0]} of {ref_path} (same sample)")


def _label_ids(arr: np.ndarray, path, num_classes: int, ignore_index: int) -> np.ndarray:
  label = to_grey(arr, path, "strict")[..., 0]
  valid = (label < num_classes) | (label == ignore_index)
  if not valid.all():
    bad = np.unique(label[~valid])
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
    raise LabelRangeError(path, f"label ids {shown} are outside the class range "
                                f"0-{num_classes - 1} (and not the ignore index "
                                f"{ignore_index})")
  return label


class Layout:
  """Base class. Subclasses set ``info``, ``description`` and implement the two methods."""

  info: info_lib.DatasetInfo
  description: str

  def list_splits(self, root) -> dict[str, list[Sample]]:
    """Returns split name -> samples (sorted by name), checking only what listing needs."""
    raise NotImplementedError

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    """Decodes and checks one sample into a pipeline element."""
    raise NotImplementedError

# -- shared helpers ---------------------------------------------------------------------

  def layout_error(self, path, problem: str) -> LayoutError:
    return LayoutError(path, f"{problem}\nExpected layout for {self.info.name}:\n"
                             f"{self.description}\nGet the data from {self.info.source}.")

  def _require_dir(self, path) -> None:
    if not os.path.isdir(path):
      raise self.layout_error(path, "folder does not exist")

  def validate(self, root, *, grey_policy: str = "strict", num_threads: int | None = None,
               progress: bool = False) -> dict[str, list[Sample]]:
    """Lists the splits and decodes + checks every sample once; writes nothing.

    Returns the split plan of :meth:`list_splits`. Raises the first :class:`DatasetError`
    in sample order.
    """
    splits = self.list_splits(root)
    for split, samples in splits.items():
      if not samples:  # TFDS cannot write an empty split
        raise SplitListError(root, f"split {split!r} has no samples")
    unique = {}
    for samples in splits.values():
      for s in samples:
        unique.setdefault(s.files, s)
    todo = list(unique.values())
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    bar = None
    if progress:
      import tqdm
      bar = tqdm.tqdm(total=len(todo), desc=f"Checking {self.info.name}", unit="sample")
    ex = concurrent.futures.ThreadPoolExecutor(num_threads)
    try:
      for _ in ex.map(lambda s: self.load(s, grey_policy), todo):
        if bar is not None:
          bar.update(1)
    finally:
      ex.shutdown(wait=True, cancel_futures=True)
      if bar is not None:
        bar.close()
    return splits


# ------------------------------------------------------------------------------------------
# MFNet
# ------------------------------------------------------------------------------------------


def read_split_list(path) -> list[str]:
  """Reads a split list: one sample name per line (a ``.png`` suffix is dropped).

  Trailing blank lines are allowed; a blank line between entries or a repeated name raises
  :class:`SplitListError`.
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise SplitListError(path, f"cannot be read ({e.strerror})") from None
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise SplitListError(path, f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): "
                               "expected one sample name a line") from None
  lines = text.splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  names, seen = [], {}
  for i, line in enumerate(lines, 1):
    name = line.strip()
    if name.endswith(".png"):
      name = name[:-4]
    if not name:
      raise SplitListError(path, f"line {i} is an empty entry")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (
        len(name) > 1 and name[1] == ":"):
      raise SplitListError(path, f"line {i}: {name!r} is a path out of the dataset folder: "
                                 "expected a sample name (e.g. 00001D)")
    if name in seen:
      raise SplitListError(path, f"line {i}: {name!r} is duplicated (first on line "
                                 f"{seen[name]})")
    seen[name] = i
    names.append(name)
  if not names:
    raise SplitListError(path, "the split list is empty")
  return names


class MFNetLayout(Layout):
  info = info_lib.MFNET
  description = ("  ROOT/images/<name>.png   4-channel uint8 PNG: RGB + thermal as channel 4\n"
                 "  ROOT/labels/<name>.png   single-channel class ids 0-8 (255 = ignore)\n"
                 "  ROOT/train.txt ROOT/val.txt ROOT/test.txt   one name per line, e.g. 00001D\n"
                 "  ROOT/test_day.txt ROOT/test_night.txt       optional (else derived from "
                 "the D/N suffix)")
  split_files = ("train", "val", "test")

  def list_splits(self, root) -> dict[str, list[Sample]]:
    root = os.fspath(root)
    self._require_dir(root)
    for sub in ("images", "labels"):
      self._require_dir(os.path.join(root, sub))
    lists = {}
    for split in self.split_files:
      path = os.path.join(root, f"{split}.txt")
      if not os.path.isfile(path):
        raise self.layout_error(path, "split list does not exist")
      lists[split] = read_split_list(path)
    owner = {}
    for split, names in lists.items():
      for name in names:
        if name in owner:
          raise SplitListError(os.path.join(root, f"{split}.txt"),
                               f"{name!r} is also in {owner[name]}.txt (splits overlap)")
        owner[name] = split
    test = set(lists["test"])
    for split, suffix in (("test_day", "D"), ("test_night", "N")):
      path = os.path.join(root, f"{split}.txt")
      if os.path.isfile(path):
        names = read_split_list(path)
        extra = [n for n in names if n not in test]
        if extra:
          raise SplitListError(path, f"{extra[0]!r} is not in test.txt")
      else:
        names = [n for n in lists["test"] if n.endswith(suffix)]
      lists[split] = names
    if not os.path.isfile(os.path.join(root, "test_day.txt")) or not os.path.isfile(
            os.path.join(root, "test_night.txt")):
      odd = [n for n in lists["test"] if not n.endswith(("D", "N"))]
      if odd:
        raise SplitListError(os.path.join(root, "test.txt"),
                             f"{odd[0]!r} has no D/N suffix, and test_day.txt / "
                             "test_night.txt are missing to say which it is")
    return {split: [self.sample(root, n) for n in sorted(names)]
            for split, names in lists.items()}

  @staticmethod
  def sample(root, name: str) -> Sample:
    return Sample(name, (("image", os.path.join(root, "images", f"{name}.png")),
                         ("label", os.path.join(root, "labels", f"{name}.png"))))

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    img_path, lab_path = sample.file("image"), sample.file("label")
    image = read_image(img_path)
    if image.shape[-1] != 4:
      raise ChannelError(img_path, f"expected 4 channels (RGB + thermal as channel 4), got "
                                   f"{image.shape[-1]}")
    raw_label = read_image(lab_path, palette_indices=True)
    _check_sizes({"image": (img_path, image), "label": (lab_path, raw_label)})
    label = _label_ids(raw_label, lab_path, self.info.num_classes, self.info.ignore_index)
    return {"rgb": np.ascontiguousarray(image[..., :3]),
            "thermal": np.ascontiguousarray(image[..., 3:]),
            "label": label, "name": sample.name}


# ------------------------------------------------------------------------------------------
# Folder-per-modality layouts (FMB, VDT-2048)
# ------------------------------------------------------------------------------------------


class FolderLayout(Layout):
  """``ROOT/<split dir>/<role dir>/<name>.<ext>``; ``val`` carved from the train split."""

  split_dirs: dict[str, str]  # official split -> folder ("train" must be one)
  role_dirs: dict[str, str]  # role ("rgb", "thermal", "depth", "label") -> folder
  label_is_ids = True  # palette label images hold class ids (False: expand to grey values)

  def _names(self, split_root: str) -> dict[str, dict[str, str]]:
    """name -> role -> path, over all role folders of one split."""
    table: dict[str, dict[str, str]] = {}
    for role, sub in self.role_dirs.items():
      folder = os.path.join(split_root, sub)
      self._require_dir(folder)
      for fname in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(fname)
        if ext.lower() not in IMAGE_SUFFIXES or fname.startswith("."):
          continue
        entry = table.setdefault(stem, {})
        if role in entry:
          raise SplitListError(os.path.join(folder, fname),
                               f"duplicated entry: {os.path.basename(entry[role])} "
                               "has the same name")
        entry[role] = os.path.join(folder, fname)
    if not table:
      raise self.layout_error(split_root, "no images found")
    for name, entry in sorted(table.items()):
      for role, sub in self.role_dirs.items():
        if role not in entry:
          present = next(iter(entry.values()))
          raise MissingFileError(os.path.join(split_root, sub, f"{name}.png"),
                                 f"missing {role} file of sample {name!r} "
                                 f"({present} exists)")
    return table

  def list_splits(self, root) -> dict[str, list[Sample]]:
    root = os.fspath(root)
    self._require_dir(root)
    out = {}
    for split, sub in self.split_dirs.items():
      table = self._names(os.path.join(root, sub))
      samples = {n: Sample(n, tuple((r, table[n][r]) for r in self.role_dirs))
                 for n in sorted(table)}
      if split == "train":
        train, val = carve_val(list(samples))
        out["train"] = [samples[n] for n in train]
        out["val"] = [samples[n] for n in val]
      else:
        out[split] = list(samples.values())
    return {s: out[s] for s in self.info.splits}

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    arrays = {}
    for role, path in sample.files:
      arr = read_image(path, palette_indices=(role == "label" and self.label_is_ids))
      if role == "rgb":
        arr = to_rgb(arr, path)
      elif role in ("thermal", "depth"):
        arr = to_grey(arr, path, grey_policy)
      arrays[role] = (path, arr)
    _check_sizes(arrays)
    out = {role: arr for role, (_, arr) in arrays.items() if role != "label"}
    lab_path, raw = arrays["label"]
    out["label"] = self.make_label(raw, lab_path)
    out["name"] = sample.name
    return out

  def make_label(self, raw: np.ndarray, path) -> np.ndarray:
    return _label_ids(raw, path, self.info.num_classes, self.info.ignore_index)


class FMBLayout(FolderLayout):
  info = info_lib.FMB
  split_dirs = {"train": "train", "test": "test"}
  role_dirs = {"rgb": "Visible", "thermal": "Infrared", "label": "Label"}
  description = ("  ROOT/train/Visible/<name>.png    RGB\n"
                 "  ROOT/train/Infrared/<name>.png   grey (1 channel, or 3 equal channels)\n"
                 "  ROOT/train/Label/<name>.png      class ids 0-14 (255 = ignore)\n"
                 "  ROOT/test/{Visible,Infrared,Label}/<name>.png   likewise\n"
                 "  (a 'color' folder beside them is ignored)")


class VDTLayout(FolderLayout):
  info = info_lib.VDT
  label_is_ids = False
  split_dirs = {"train": "Train", "test": "Test"}
  role_dirs = {"rgb": "V", "depth": "D", "thermal": "T", "label": "GT"}
  description = ("  ROOT/Train/V/<name>.png    visible RGB\n"
                 "  ROOT/Train/D/<name>.png    depth, grey (1 channel, or 3 equal channels)\n"
                 "  ROOT/Train/T/<name>.png    thermal, grey (likewise)\n"
                 "  ROOT/Train/GT/<name>.png   saliency mask (salient where > 127)\n"
                 "  ROOT/Test/{V,D,T,GT}/<name>.png   likewise")

  def make_label(self, raw: np.ndarray, path) -> np.ndarray:
    return (to_grey(raw, path, "strict")[..., 0] > 127).astype(np.uint8)


LAYOUTS = {"mfnet": MFNetLayout(), "fmb": FMBLayout(), "vdt": VDTLayout()}


def get_layout(name: str) -> Layout:
  return LAYOUTS[info_lib.get_info(name).name]


__all__ = ["Sample", "Layout", "MFNetLayout", "FMBLayout", "VDTLayout", "LAYOUTS", "get_layout",
           "carve_val", "read_split_list", "VAL_FRACTION", "DatasetError"]
