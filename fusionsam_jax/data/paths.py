"""Where prepared datasets live on disk (no TFDS import)."""

from __future__ import annotations

import os

from fusionsam_jax.data import info as info_lib

#: Version of the TFDS builders' on-disk format (`builders`).
VERSION = "1.0.0"


def dataset_dir(name: str, data_dir) -> str:
  """``data_dir/<name>/<version>``, where a prepared dataset lives."""
  return os.path.join(os.fspath(data_dir), info_lib.get_info(name).name, VERSION)


def is_prepared(name: str, data_dir) -> bool:
  return os.path.isfile(os.path.join(dataset_dir(name, data_dir), "dataset_info.json"))
