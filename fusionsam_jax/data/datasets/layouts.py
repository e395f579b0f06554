"""The general layouts: `FolderLayout` (split folders, one folder per modality inside, val
carved from train: FMB, VDT-2048) and `ListLayout` (one folder per modality + split lists:
the custom dataset, and any spec that declares it)."""

from __future__ import annotations

import os

import numpy as np

from fusionsam_jax.data.datasets.base import (Layout, Sample, carve_val, image_table,
                                              match_by_name, read_split_list,
                                              write_split_list)
from fusionsam_jax.data.io import MissingFileError, SplitListError, write_png


class FolderLayout(Layout):
  """``ROOT/<split dir>/<role dir>/<name>.<ext>``; ``val`` carved from the train split.

  Args:
    split_dirs: official split -> folder ("train" must be one).
    role_dirs: role ("rgb", "thermal", "depth", "label") -> folder.
    description: the expected tree, for messages.
    extra_dirs: role folders the writer adds beside (e.g. FMB's ``color``: the label in
      the palette); listing ignores them.
  """

  def __init__(self, split_dirs: dict[str, str], role_dirs: dict[str, str], description: str,
               extra_dirs: tuple[str, ...] = ()):
    self.split_dirs = dict(split_dirs)
    self.role_dirs = dict(role_dirs)
    self.description = description
    self.extra_dirs = tuple(extra_dirs)

  def _table(self, split_root: str) -> dict[str, dict[str, str]]:
    """role -> (name -> path) over all role folders of one split."""
    tables = {}
    for role, sub in self.role_dirs.items():
      folder = os.path.join(split_root, sub)
      self.require_dir(folder)
      tables[role] = image_table(folder)
    if not any(tables.values()):
      raise self.layout_error(split_root, "no images found")
    return tables

  def _samples(self, split_root: str) -> list[Sample]:
    tables = self._table(split_root)
    for name in sorted(set().union(*[set(t) for t in tables.values()])):
      for role, sub in self.role_dirs.items():
        if name not in tables[role]:
          present = next(t[name] for t in tables.values() if name in t)
          raise MissingFileError(os.path.join(split_root, sub, f"{name}.png"),
                                 f"missing {role} file of sample {name!r} "
                                 f"({present} exists)")
    names = sorted(set().union(*[set(t) for t in tables.values()]))
    return [Sample(n, tuple((r, tables[r][n]) for r in self.role_dirs)) for n in names]

  def list_splits(self, root) -> dict[str, list[Sample]]:
    root = os.fspath(root)
    self.require_dir(root)
    out = {}
    for split, sub in self.split_dirs.items():
      samples = {s.name: s for s in self._samples(os.path.join(root, sub))}
      if split == "train":
        train, val = carve_val(list(samples))
        out["train"] = [samples[n] for n in train]
        out["val"] = [samples[n] for n in val]
      else:
        out[split] = list(samples.values())
    return {s: out[s] for s in self.spec.splits}

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    return self.load_roles(sample, grey_policy)

  def input_samples(self, root, modalities, split=None) -> list[Sample]:
    root = os.fspath(root)
    if split:
      base = os.path.join(root, self.split_dirs.get(split, split))
      if not os.path.isdir(base):
        raise self.layout_error(base, f"no folder for split {split!r} (expected one of "
                                      f"{sorted(self.split_dirs.values())})")
    else:
      base = root
    dirs = {m: os.path.join(base, self.role_dirs[m]) for m in modalities}
    for m, d in dirs.items():
      if not os.path.isdir(d):
        hint = (f" (or pass a split: {', '.join(self.split_dirs)})" if not split else "")
        raise self.layout_error(d, f"missing {m} folder{hint}")
    samples = match_by_name({m: image_table(d) for m, d in dirs.items()}, dirs)
    if not samples:
      raise self.layout_error(base, "no images found")
    return samples

  def folders(self) -> list[str]:
    return [os.path.join(s, r) for s in self.split_dirs.values()
            for r in (*self.role_dirs.values(), *self.extra_dirs)]

  def write_sample(self, root: str, element: dict, split: str) -> None:
    d = os.path.join(root, self.split_dirs[split])
    name = element["name"]
    for role, sub in self.role_dirs.items():
      arr = self.label_image(element["label"]) if role == "label" else element[role]
      write_png(os.path.join(d, sub, f"{name}.png"), arr)
    for sub in self.extra_dirs:
      write_png(os.path.join(d, sub, f"{name}.png"), self.extra_image(sub, element))

  def extra_image(self, folder: str, element: dict) -> np.ndarray:
    """The pixels of `element`'s file in the extra folder `folder`."""
    raise NotImplementedError(folder)


class ListLayout(Layout):
  """``ROOT/<role dir>/<name>.<ext>`` per modality and label, split lists ``ROOT/<split>.txt``.

  ``train.txt`` and ``test.txt`` are required; ``val.txt`` is optional (absent: the last 10 %
  of the sorted train names); ``test_day.txt`` / ``test_night.txt`` add those splits when both
  exist. Files are matched by name (stem), any of the image suffixes.

  Args:
    role_dirs: role ("rgb", "thermal", "depth", "label") -> folder.
  """

  required = ("train", "test")
  optional = ("val", "test_day", "test_night")

  def __init__(self, role_dirs: dict[str, str]):
    self.role_dirs = dict(role_dirs)

  @property
  def description(self) -> str:
    lines = []
    for role, sub in self.role_dirs.items():
      what = {"rgb": "RGB image", "thermal": "thermal image, grey (1 channel)",
              "depth": "depth image, grey (1 channel)",
              "label": f"class ids 0-{self.spec.num_classes - 1} "
                       f"({self.spec.ignore_index} = ignore), 1 channel"}[role]
      lines.append(f"  ROOT/{sub}/<name>.png".ljust(30) + f" {what}")
    lines.append("  ROOT/train.txt ROOT/test.txt".ljust(30) + " one name per line")
    lines.append("  ROOT/val.txt".ljust(30) + " optional (else the last 10 % of train)")
    lines.append("  ROOT/test_day.txt ROOT/test_night.txt   optional")
    return "\n".join(lines)

  def _lists(self, root: str) -> dict[str, list[str]]:
    lists = {}
    for split in self.required + self.optional:
      path = os.path.join(root, f"{split}.txt")
      if os.path.isfile(path):
        lists[split] = read_split_list(path)
      elif split in self.required:
        raise self.layout_error(path, "split list does not exist")
    if ("test_day" in lists) != ("test_night" in lists):
      have = "test_day" if "test_day" in lists else "test_night"
      raise SplitListError(os.path.join(root, f"{have}.txt"),
                           "test_day.txt and test_night.txt come together")
    owner = {}
    for split in ("train", "val", "test"):
      for name in lists.get(split, []):
        if name in owner:
          raise SplitListError(os.path.join(root, f"{split}.txt"),
                               f"{name!r} is also in {owner[name]}.txt (splits overlap)")
        owner[name] = split
    for split in ("test_day", "test_night"):
      extra = [n for n in lists.get(split, []) if n not in set(lists["test"])]
      if extra:
        raise SplitListError(os.path.join(root, f"{split}.txt"), f"{extra[0]!r} is not in "
                                                                 "test.txt")
    if "val" not in lists:
      lists["train"], lists["val"] = carve_val(lists["train"])
    return lists

  def splits_of(self, root) -> tuple[str, ...]:
    day_night = all(os.path.isfile(os.path.join(os.fspath(root), f"{s}.txt"))
                    for s in ("test_day", "test_night"))
    return ("train", "val", "test") + (("test_day", "test_night") if day_night else ())

  def _tables(self, root: str, roles) -> tuple[dict, dict]:
    dirs = {r: os.path.join(root, self.role_dirs[r]) for r in roles}
    for d in dirs.values():
      self.require_dir(d)
    return {r: image_table(d) for r, d in dirs.items()}, dirs

  def list_splits(self, root) -> dict[str, list[Sample]]:
    root = os.fspath(root)
    self.require_dir(root)
    lists = self._lists(root)
    tables, dirs = self._tables(root, list(self.role_dirs))
    return {s: match_by_name(tables, dirs, lists[s]) for s in self.splits_of(root)}

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    return self.load_roles(sample, grey_policy)

  def input_samples(self, root, modalities, split=None) -> list[Sample]:
    root = os.fspath(root)
    self.require_dir(root)
    names = None
    if split:
      path = os.path.join(root, f"{split}.txt")
      if split == "val" and not os.path.isfile(path):
        names = self._lists(root)["val"]
      elif not os.path.isfile(path):
        raise self.layout_error(path, f"no split list for split {split!r}")
      else:
        names = read_split_list(path)
    tables, dirs = self._tables(root, list(modalities))
    samples = match_by_name(tables, dirs, names)
    if not samples:
      raise self.layout_error(root, "no images found")
    return samples

  def folders(self) -> list[str]:
    return list(self.role_dirs.values())

  def write_sample(self, root: str, element: dict, split: str) -> None:
    name = element["name"]
    for role, sub in self.role_dirs.items():
      arr = self.label_image(element["label"]) if role == "label" else element[role]
      write_png(os.path.join(root, sub, f"{name}.png"), arr)

  def write_splits(self, root: str, splits: dict[str, list[str]]) -> None:
    for s, names in splits.items():
      if s in self.required + self.optional and names:
        write_split_list(os.path.join(root, f"{s}.txt"), names)


__all__ = ["FolderLayout", "ListLayout"]
