"""The dataset registry: `register(spec)`, `get(name)`, `names()`.

Built-in specs (MFNet, FMB, VDT-2048) are registered by the package; a custom dataset is
resolved from its folder (``custom:/path/to/data``, read from its ``dataset.json``); any
other spec can be added with `register` (a test file, a user module).
"""

from __future__ import annotations

import os

from fusionsam_jax.data.datasets import custom
from fusionsam_jax.data.datasets.base import DatasetSpec

_SPECS: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}
_CUSTOM: dict[str, tuple[float, DatasetSpec]] = {}


def _norm(name: str) -> str:
  return name.lower().replace("-", "").replace("_", "")


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
  """Adds `spec` under its name (and aliases); returns it. A name taken by another spec
  raises ValueError unless `replace`."""
  if not isinstance(spec, DatasetSpec):
    raise TypeError(f"register: expected a DatasetSpec, got {type(spec).__name__}")
  if spec.key != spec.name:
    raise ValueError(f"register: {spec.key!r} is a folder dataset; get() reads it from there")
  taken = _SPECS.get(spec.name)
  if taken is not None and taken is not spec and not replace:
    raise ValueError(f"dataset {spec.name!r} is already registered")
  _SPECS[spec.name] = spec
  for a in (spec.name, *spec.aliases):
    _ALIASES[_norm(a)] = spec.name
  return spec


def unregister(name: str) -> None:
  """Removes a registered spec (tests)."""
  spec = _SPECS.pop(name)
  for a in (spec.name, *spec.aliases):
    _ALIASES.pop(_norm(a), None)


def names() -> tuple[str, ...]:
  """Registered names (built-ins first), without the folder datasets."""
  return tuple(_SPECS)


def get(name) -> DatasetSpec:
  """The spec of `name`: a registered name or alias ("mfnet", "VDT-2048", ...), a spec
  (returned as is), or ``custom:<folder>`` (read from the folder's dataset.json; reread when
  the file changes). Raises ValueError for an unknown name, LayoutError for a folder without
  a valid dataset.json."""
  if isinstance(name, DatasetSpec):
    return name
  name = str(name)
  if name.startswith(custom.PREFIX):
    root = os.path.abspath(name[len(custom.PREFIX):])
    path = os.path.join(root, custom.FILE)
    mtime = os.path.getmtime(path) if os.path.isfile(path) else -1.0
    hit = _CUSTOM.get(root)
    if hit is None or hit[0] != mtime:
      hit = _CUSTOM[root] = (mtime, custom.read_spec(root))
    return hit[1]
  key = _ALIASES.get(_norm(name))
  if key is None:
    hint = (" ('custom' needs its folder: custom:/path/to/data, or --dataset custom "
            "--manual_dir /path/to/data)" if _norm(name) == "custom" else "")
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(names())} or "
                     f"custom:/path/to/data{hint}")
  return _SPECS[key]


def resolve(name: str, folder=None) -> DatasetSpec:
  """`get`, where "custom" means the custom dataset in `folder` (prepare's --manual_dir)."""
  if str(name).lower() == "custom" and folder is not None:
    return get(custom.key_for(folder))
  return get(name)


__all__ = ["register", "unregister", "get", "names", "resolve"]
