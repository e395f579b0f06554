"""Where prepared datasets live on disk (no TFDS import)."""

from __future__ import annotations

import json
import os
import re

from fusionsam_jax.data import datasets

#: Version of the TFDS builders' on-disk format (`builders`).
VERSION = "1.0.0"


def dataset_dir(name: str, data_dir) -> str:
  """``data_dir/<name>/<version>``, where a prepared dataset lives (`name`: a registry
  name or ``custom:<folder>``; the folder is the spec's short name)."""
  return os.path.join(os.fspath(data_dir), datasets.get(name).name, VERSION)


def is_prepared(name: str, data_dir) -> bool:
  return os.path.isfile(os.path.join(dataset_dir(name, data_dir), "dataset_info.json"))


def prepared_splits(name: str, data_dir) -> tuple[str, ...]:
  """The split names of a prepared dataset, read from its ``dataset_info.json`` (no TFDS
  import: a CLI checks ``--split`` with it before anything heavy). Raises FileNotFoundError
  when the dataset is not prepared, ValueError when the file is damaged."""
  path = os.path.join(dataset_dir(name, data_dir), "dataset_info.json")
  try:
    with open(path) as f:
      return tuple(s["name"] for s in json.load(f)["splits"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); prepare the dataset "
                     "again") from None


def check_split(name: str, data_dir, split: str) -> None:
  """Raises ValueError naming the prepared splits when `split` (TFDS syntax allowed:
  ``train+val``, ``train[:50%]``) names one the prepared dataset lacks; does nothing when
  the dataset is not prepared (what needs it says so)."""
  try:
    have = prepared_splits(name, data_dir)
  except FileNotFoundError:
    return
  for part in split.split("+"):
    base = re.sub(r"\[.*\]$", "", part.strip())
    if base not in have:
      raise ValueError(f"--split {split}: the {name} dataset has no split {base!r}; it has "
                       f"{', '.join(have)}")
