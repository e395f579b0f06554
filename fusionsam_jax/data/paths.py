"""Where prepared datasets live on disk (no TFDS import)."""

from __future__ import annotations

import os

from fusionsam_jax.data import datasets

#: Version of the TFDS builders' on-disk format (`builders`).
VERSION = "1.0.0"


def dataset_dir(name: str, data_dir) -> str:
  """``data_dir/<name>/<version>``, where a prepared dataset lives (`name`: a registry
  name or ``custom:<folder>``; the folder is the spec's short name)."""
  return os.path.join(os.fspath(data_dir), datasets.get(name).name, VERSION)


def is_prepared(name: str, data_dir) -> bool:
  return os.path.isfile(os.path.join(dataset_dir(name, data_dir), "dataset_info.json"))
