"""A dataset declared once: `DatasetSpec` (facts + on-disk layout + split rules + paper row).

A spec holds everything the package knows about a dataset. Its `Layout` lists a split's
samples, reads a sample into a pipeline element, lists predict's inputs and (when it can)
writes a sample: the TFDS builders, ``prepare``, the scene generator and ``predict`` all go
through it. An element is ``{"rgb": (H, W, 3), "thermal": (H, W, 1), ["depth": (H, W, 1)],
"label": (H, W), "name": str}`` (uint8).

Two general layouts (``layouts.py``) cover most datasets: `FolderLayout` (``ROOT/<split dir>/
<role dir>/<name>.png``, val carved from train: FMB, VDT-2048) and `ListLayout`
(``ROOT/<role dir>/<name>.png`` + split lists ``train.txt val.txt test.txt``: custom).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from typing import Sequence

import numpy as np
import tqdm

from fusionsam_jax.data.io import (DatasetError, IMAGE_SUFFIXES, LabelRangeError, LayoutError,
                                   MissingFileError, read_image, SizeMismatchError,
                                   SplitListError, to_grey, to_rgb)


def palette_lut(palette, ignored=(0, 0, 0)) -> np.ndarray:
  """uint8 (256, 3) lookup table: class id -> its palette colour; the ignore label (255) ->
  `ignored`; every other value black. Raises ValueError for more than 255 colours."""
  pal = np.asarray(palette, np.uint8).reshape(-1, 3)
  if len(pal) > 255:
    raise ValueError(f"palette has {len(pal)} colours; at most 255 classes")
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(pal)] = pal
  lut[255] = np.asarray(ignored, np.uint8)
  return lut


IGNORE_INDEX = 255

#: Channels of each modality in a pipeline element (channels-last, uint8).
MODALITY_CHANNELS = {"rgb": 3, "thermal": 1, "depth": 1}

#: Fraction of the official train set (sorted names, the last ones) held out as ``val``
#: for layouts without an official validation split (FMB, VDT-2048, custom without val.txt).
VAL_FRACTION = 0.1

#: A dataset's short name: a folder under ``data_dir`` and the TFDS builder's name.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class PaperTable:
  """The FusionSAM row of one of the paper's result tables (KDD '25, Sec. 4.3).

  Attributes:
      dataset: registry name.
      table: "Table 1" / "Table 2".
      split: the split the paper reports ("test").
      columns: ``(class_name, header)`` pairs in the paper's column order (the class names
          are this package's; the headers are the paper's).
      iou: FusionSAM's per-column IoU in percent, as printed in the paper.
      miou: FusionSAM's mIoU in percent, as printed (over all classes, also where the table
          shows only some of them, as Table 2 does).
  """

  dataset: str
  table: str
  split: str
  columns: tuple[tuple[str, str], ...]
  iou: tuple[float, ...]
  miou: float

  def iou_by_class(self) -> dict[str, float]:
    """class name -> IoU in percent."""
    return {c: v for (c, _), v in zip(self.columns, self.iou)}


@dataclasses.dataclass(frozen=True)
class SceneRecipe:
  """How ``fusionsam_jax.data.generate`` fills a dataset with generated scenes.

  Attributes:
      scenes: the drawing family in ``generate.SCENES`` ("mfnet", "fmb", "vdt"); its class
          ids and modalities must fit the spec's.
      split_pattern: sample i goes to the on-disk split ``split_pattern[i % len]`` ("val" in
          the pattern: an on-disk val split; else val is carved from train as the layout
          reads it).
      night_suffix: sample names end with ``D`` (day) / ``N`` (night), as MFNet's.
  """

  scenes: str
  split_pattern: tuple[str, ...]
  night_suffix: bool = False


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


def write_split_list(path, names: Sequence[str]) -> None:
  """Writes one name a line (what `read_split_list` reads)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(f"{n}\n" for n in names))


def check_sizes(arrays: dict[str, tuple[str, np.ndarray]]) -> None:
  """Raises SizeMismatchError unless all arrays share (H, W). ``arrays``: role -> (path, arr)."""
  items = list(arrays.values())
  ref_path, ref = items[0]
  for path, arr in items[1:]:
    if arr.shape[:2] != ref.shape[:2]:
      raise SizeMismatchError(
          path, f"size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from "
                f"{ref.shape[1]}x{ref.shape[0]} of {ref_path} (same sample)")


def label_ids(arr: np.ndarray, path, num_classes: int, ignore_index: int) -> np.ndarray:
  """A label image's class ids (H, W), checked against the class range and ignore index."""
  label = to_grey(arr, path, "strict")[..., 0]
  valid = (label < num_classes) | (label == ignore_index)
  if not valid.all():
    bad = np.unique(label[~valid])
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
    raise LabelRangeError(path, f"label ids {shown} are outside the class range "
                                f"0-{num_classes - 1} (and not the ignore index "
                                f"{ignore_index})")
  return label


def as_modality(arr: np.ndarray, modality: str, path, grey_policy: str = "strict"
                ) -> np.ndarray:
  """Checks a decoded image as `modality`: RGB (H, W, 3) or grey (H, W, 1).

  Raises ChannelError naming `path` (a grey image for rgb, a colour image for a grey
  modality under policy "strict")."""
  if modality == "rgb":
    return to_rgb(arr, path)
  return to_grey(arr, path, grey_policy)


def image_table(folder: str) -> dict[str, str]:
  """stem -> file of the images in `folder` (hidden files and other suffixes skipped).
  Two files of one stem (``x.png``, ``x.bmp``) raise SplitListError."""
  table: dict[str, str] = {}
  for fname in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(fname)
    if ext.lower() not in IMAGE_SUFFIXES or fname.startswith("."):
      continue
    if stem in table:
      raise SplitListError(os.path.join(folder, fname),
                           f"duplicated entry: {os.path.basename(table[stem])} and {fname} "
                           f"are both named {stem!r}")
    table[stem] = os.path.join(folder, fname)
  return table


def match_by_name(tables: dict[str, dict[str, str]], where: dict[str, str],
                  names: Sequence[str] | None = None) -> list[Sample]:
  """Samples from per-role ``stem -> file`` tables, matched by file name (never by order).

  Args:
    tables: role -> (stem -> file).
    where: role -> folder (for messages).
    names: the sample names to take (a split list); None: every stem, and then a stem
      present for some roles only is an error.

  Raises MissingFileError naming the first unmatched name(s) and the folder that lacks them.
  """
  roles = list(tables)
  if names is None:
    all_names = sorted(set().union(*[set(t) for t in tables.values()]))
  else:
    all_names = list(names)
  for role in roles:
    missing = [n for n in all_names if n not in tables[role]]
    if missing:
      shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)"
                                        if len(missing) > 5 else "")
      other = next((tables[r][missing[0]] for r in roles if missing[0] in tables[r]), None)
      has = f" ({other} exists)" if other else ""
      raise MissingFileError(os.path.join(where[role], f"{missing[0]}.png"),
                             f"missing {role} file of sample {missing[0]!r}{has}; "
                             f"unmatched name(s) in {where[role]}: {shown}")
  return [Sample(n, tuple((r, tables[r][n]) for r in roles)) for n in sorted(all_names)]


class Layout:
  """How a dataset lies on disk. Subclasses implement `list_splits` and `load`; those that
  can write implement `folders`, `write_sample` (and `write_splits` where split lists
  exist). The spec sets `spec` on its layout."""

  description: str = ""
  spec: "DatasetSpec"

  # -- reading (prepare, TFDS builders) -------------------------------------------------------

  def list_splits(self, root) -> dict[str, list[Sample]]:
    """Returns split name -> samples (sorted by name), checking only what listing needs."""
    raise NotImplementedError

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    """Decodes and checks one sample into a pipeline element."""
    raise NotImplementedError

  def splits_of(self, root) -> tuple[str, ...]:
    """The splits a prepared copy of the folder `root` has (the spec's by default)."""
    return self.spec.splits

  # -- predict's inputs -------------------------------------------------------------------

  def input_samples(self, root, modalities: Sequence[str], split: str | None = None
                    ) -> list[Sample]:
    """The unlabelled samples of a folder in this layout (predict's ``--input_dir``): the
    roles are the modalities (or a combined file). Raises LayoutError (with the expected
    tree) for a folder without the layout, MissingFileError for unmatched names."""
    raise NotImplementedError

  def load_inputs(self, sample: Sample, modalities: Sequence[str],
                  grey_policy: str = "strict") -> dict:
    """modality -> uint8 (H, W, C) of an `input_samples` sample."""
    arrays = {}
    for m in modalities:
      path = sample.file(m)
      arrays[m] = (path, as_modality(read_image(path), m, path, grey_policy))
    check_sizes(arrays)
    return {m: a for m, (_, a) in arrays.items()}

  # -- writing (the scene generator) ------------------------------------------------------------

  @property
  def can_write(self) -> bool:
    return type(self).write_sample is not Layout.write_sample

  def folders(self) -> list[str]:
    """Folders (relative to the root) the writer fills: made up front, empty ones too."""
    return []

  def write_sample(self, root: str, element: dict, split: str) -> None:
    """Writes `element` as a sample of the on-disk split `split` (train / val / test)."""
    raise NotImplementedError(f"the {self.spec.name} layout cannot be written")

  def write_splits(self, root: str, splits: dict[str, list[str]]) -> None:
    """Writes split lists where the layout has them (split -> names)."""

  # -- shared helpers ---------------------------------------------------------------------

  def layout_error(self, path, problem: str) -> LayoutError:
    src = f"\nGet the data from {self.spec.source}." if self.spec.source else ""
    return LayoutError(path, f"{problem}\nExpected layout for {self.spec.name}:\n"
                             f"{self.description}{src}")

  def require_dir(self, path) -> None:
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
      bar = tqdm.tqdm(total=len(todo), desc=f"Checking {self.spec.name}", unit="sample")
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

  def make_label(self, raw: np.ndarray, path) -> np.ndarray:
    """Class ids of a decoded label image (palette indices for palette PNGs)."""
    return label_ids(raw, path, self.spec.num_classes, self.spec.ignore_index)

  def label_image(self, label: np.ndarray) -> np.ndarray:
    """The label file's pixels for class ids `label` (the inverse of `make_label`)."""
    return label

  def load_roles(self, sample: Sample, grey_policy: str) -> dict:
    """An element from a sample whose roles are modalities + "label"."""
    arrays = {}
    for role, path in sample.files:
      arr = read_image(path, palette_indices=(role == "label" and self.label_is_ids))
      if role != "label":
        arr = as_modality(arr, role, path, grey_policy)
      arrays[role] = (path, arr)
    check_sizes(arrays)
    out = {role: arr for role, (_, arr) in arrays.items() if role != "label"}
    lab_path, raw = arrays["label"]
    out["label"] = self.make_label(raw, lab_path)
    out["name"] = sample.name
    return out

  label_is_ids = True  # palette label images hold class ids (False: expand to grey values)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSpec:
  """Everything the package knows about one dataset.

  Attributes:
      name: short name: the folder under ``data_dir`` and the TFDS builder's name
          (lower case, ``[a-z][a-z0-9_]*``).
      task: "semantic" (per-pixel class ids) or "saliency" (binary {0, 1} masks).
      class_names: one name per class id (id = position).
      palette: one RGB colour per class id, for colour-coded masks.
      modalities: image keys of an element, RGB first.
      native_size: (height, width) of the official images (None: any size).
      splits: split names a prepared dataset has.
      source: where to get the data (for error messages and docs).
      layout: how the data lies on disk (`Layout`).
      ignore_index: label value that carries no supervision (never a class id).
      paper: the paper's FusionSAM row for this dataset (`PaperTable`), if any.
      generator: how the scene generator fills it (`SceneRecipe`), if it can.
      aliases: other names `get` accepts ("vdt2048").
      key: what ``config.dataset`` holds and `registry.get` resolves (default: name;
          a custom dataset's is ``custom:<folder>``).
  """

  name: str
  task: str
  class_names: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  modalities: tuple[str, ...]
  native_size: tuple[int, int] | None
  splits: tuple[str, ...]
  source: str
  layout: Layout
  ignore_index: int = IGNORE_INDEX
  paper: PaperTable | None = None
  generator: SceneRecipe | None = None
  aliases: tuple[str, ...] = ()
  key: str = ""

  def __post_init__(self):
    if not NAME_RE.match(self.name):
      raise ValueError(f"dataset name {self.name!r}: expected lower case letters, digits and "
                       "'_', starting with a letter")
    if self.task not in ("semantic", "saliency"):
      raise ValueError(f"{self.name}: task {self.task!r}: expected 'semantic' or 'saliency'")
    if len(self.palette) != len(self.class_names):
      raise ValueError(f"{self.name}: {len(self.palette)} palette colours for "
                       f"{len(self.class_names)} classes")
    if not self.class_names:
      raise ValueError(f"{self.name}: no class names")
    if not self.modalities or self.modalities[0] != "rgb" or len(set(self.modalities)) != len(
        self.modalities) or any(m not in MODALITY_CHANNELS for m in self.modalities):
      raise ValueError(f"{self.name}: modalities {self.modalities}: expected 'rgb' first, then "
                       "'thermal' and/or 'depth'")
    if not 0 <= self.ignore_index <= 255 or self.ignore_index < len(self.class_names):
      raise ValueError(f"{self.name}: ignore index {self.ignore_index} must be in "
                       f"{len(self.class_names)}..255 (not a class id)")
    if not self.key:
      object.__setattr__(self, "key", self.name)
    self.layout.spec = self

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def palette_array(self) -> np.ndarray:
    """uint8 (256, 3) lookup table: class id -> colour; every other value (255 too) is black."""
    return palette_lut(self.palette)

  def colorize(self, label: np.ndarray) -> np.ndarray:
    """Maps a label map (..., H, W) of class ids to RGB (..., H, W, 3) uint8."""
    return self.palette_array()[np.asarray(label).astype(np.uint8)]

  def prepare_command(self, data_dir, manual_dir: str | None = None) -> str:
    """The command that prepares this dataset into `data_dir`."""
    if self.key.startswith("custom:"):
      src = f"custom --manual_dir {self.key[len('custom:'):]}"
    else:
      src = f"{self.name} --manual_dir {manual_dir or 'PATH/TO/' + self.name.upper()}"
    return (f"python -m fusionsam_jax.data.prepare --dataset {src} --data_dir "
            f"{os.fspath(data_dir)}")

  def __repr__(self) -> str:
    return (f"DatasetSpec({self.key!r}, {self.num_classes} classes, "
            f"{'+'.join(self.modalities)})")


__all__ = ["DatasetSpec", "Layout", "PaperTable", "SceneRecipe",
           "Sample", "carve_val", "read_split_list", "write_split_list", "check_sizes",
           "label_ids", "as_modality", "image_table", "match_by_name", "IGNORE_INDEX",
           "MODALITY_CHANNELS", "VAL_FRACTION", "DatasetError"]
