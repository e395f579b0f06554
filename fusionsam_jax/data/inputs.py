"""Reading new inputs for prediction: one sample per NAME, its modalities paired by file name
(never by order), checked before a model is loaded.

    samples = samples_from_dirs({"rgb": "rgb/", "thermal": "ir/"}, ("rgb", "thermal"))
    samples = samples_from_modalities({"rgb": [...], "thermal": [...]}, ("rgb", "thermal"))
    samples = samples_from_dir("MFNet", "mfnet", ("rgb", "thermal"), split="test")

Each is a list of ``(name, {modality: uint8 (H, W, C)})``. A name missing for a modality, a
folder without the dataset's layout (the message shows the expected tree), a colour image
given as thermal / depth or a grey image given as RGB raise `InputError` / `DatasetError`.
"""

from __future__ import annotations

import os

import numpy as np

from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.data.datasets.base import as_modality, image_table
from fusionsam_jax.data.io import IMAGE_SUFFIXES, DatasetError, read_image, to_rgb


#: Modalities with their own input flags (--rgb, --rgb_dir, ...).
MODALITIES = ("rgb", "thermal", "depth")


class InputError(ValueError):
  """Unusable inputs (files, folders, names)."""


def _read(path: str) -> np.ndarray:
  return read_image(path)


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _is_mfnet_combined(arr: np.ndarray) -> bool:
  """A 4-channel PNG whose 4th channel is not an opaque alpha: MFNet's RGB + thermal."""
  return arr.ndim == 3 and arr.shape[-1] == 4 and not np.all(arr[..., 3] == 255)


def _check_unique(names_files: list[tuple[str, str]], source: str) -> None:
  first: dict[str, str] = {}
  for name, f in names_files:
    if name in first:
      raise InputError(
          f"{source}: {first[name]} and {f} are both named {name!r}: their outputs "
          f"(OUT/labels/{name}.png, ...) would overwrite each other; give inputs distinct "
          "file names")
    first[name] = f


def _load(files: dict[str, str], modalities, grey_policy: str, source: str) -> dict:
  """modality -> checked array of one sample's files (modality -> path)."""
  el = {m: as_modality(_read(files[m]), m, files[m], grey_policy) for m in modalities}
  shapes = {m: a.shape[:2] for m, a in el.items()}
  if len(set(shapes.values())) != 1:
    raise InputError(f"{source}: the images of sample {_stem(files[modalities[0]])!r} differ "
                     f"in size: " + ", ".join(f"{files[m]} {shapes[m][1]}x{shapes[m][0]}"
                                             for m in modalities))
  return el


def samples_from_files(files: list[str], modalities: tuple[str, ...],
                       grey_policy: str = "strict", source: str = "--inputs"
                       ) -> list[tuple[str, dict]]:
  """Samples of files that each hold a WHOLE sample (``--inputs``): for a one-modality run
  its image, for an RGB + thermal run an MFNet 4-channel PNG (RGB + thermal as channel 4).
  Separate per-modality files are never grouped by their order: a file that is not a whole
  sample raises InputError pointing at `samples_from_modalities` (``--rgb`` / ``--thermal``
  ...). A sample is named after its file; two of one name raise InputError. `source` names
  the flag in messages."""
  mods = tuple(modalities)
  _check_unique([(_stem(f), f) for f in files], source)
  out = []
  for f in files:
    arr = _read(f)
    if len(mods) == 1:
      out.append((_stem(f), {mods[0]: as_modality(arr, mods[0], f, grey_policy)}))
    elif _is_mfnet_combined(arr) and set(mods) <= {"rgb", "thermal"}:
      parts = {"rgb": np.ascontiguousarray(arr[..., :3]),
               "thermal": np.ascontiguousarray(arr[..., 3:])}
      out.append((_stem(f), {m: parts[m] for m in mods}))
    else:
      flags = " ".join(f"--{m} PATH" for m in mods)
      raise InputError(
          f"{source}: {f} ({arr.shape[-1]} channel(s)) is not a whole {'+'.join(mods)} "
          f"sample (an MFNet 4-channel PNG); give each modality's files with {flags} (or "
          f"{' '.join(f'--{m}_dir DIR' for m in mods)}): they are paired by file name")
  return out


def samples_from_modalities(files: dict[str, list[str]], modalities: tuple[str, ...],
                            grey_policy: str = "strict", source: str = "inputs"
                            ) -> list[tuple[str, dict]]:
  """Samples from per-modality file lists (``--rgb A --thermal B``), paired by file name.

  With one file per modality that file pair is the sample (named after the first
  modality's file, whatever the names); with more, files are matched by name (stem) and any
  name missing for a modality raises InputError naming it. Order never pairs files."""
  mods = tuple(modalities)
  extra = sorted(set(files) - set(mods))
  missing = [m for m in mods if not files.get(m)]
  if extra or missing:
    raise InputError(f"{source}: this run reads {'+'.join(mods)}: "
                     + (f"missing --{missing[0]}" if missing else f"unexpected --{extra[0]}"))
  if all(len(files[m]) == 1 for m in mods):
    group = {m: files[m][0] for m in mods}
    return [(_stem(group[mods[0]]), _load(group, mods, grey_policy, source))]
  tables = {}
  for m in mods:
    _check_unique([(_stem(f), f) for f in files[m]], f"--{m}")
    tables[m] = {_stem(f): f for f in files[m]}
  return _pair(tables, {m: f"--{m}" for m in mods}, mods, grey_policy, source)


def _pair(tables: dict[str, dict[str, str]], where: dict[str, str], mods, grey_policy: str,
          source: str) -> list[tuple[str, dict]]:
  names = sorted(set().union(*[set(t) for t in tables.values()]))
  problems = []
  for m in mods:
    lacking = [n for n in names if n not in tables[m]]
    if lacking:
      shown = ", ".join(lacking[:5]) + (f", ... ({len(lacking)} in all)"
                                        if len(lacking) > 5 else "")
      problems.append(f"no {m} image in {where[m]} for name(s) {shown}")
  if problems:
    raise InputError(f"{source}: {'; '.join(problems)}: files are paired by name (stem), "
                     "give every modality the same names")
  return [(n, _load({m: tables[m][n] for m in mods}, mods, grey_policy, source))
          for n in names]


def samples_from_dirs(dirs: dict[str, str], modalities: tuple[str, ...],
                      grey_policy: str = "strict") -> list[tuple[str, dict]]:
  """Samples from one folder per modality (``--rgb_dir A --thermal_dir B``), paired by file
  name (stem); a name missing in one folder raises InputError naming it."""
  mods = tuple(modalities)
  extra = sorted(set(dirs) - set(mods))
  missing = [m for m in mods if not dirs.get(m)]
  if extra or missing:
    raise InputError(f"this run reads {'+'.join(mods)}: "
                     + (f"missing --{missing[0]}_dir" if missing else
                        f"unexpected --{extra[0]}_dir"))
  tables = {}
  for m in mods:
    d = dirs[m]
    if not os.path.isdir(d):
      raise InputError(f"--{m}_dir {d}: not a folder")
    try:
      tables[m] = image_table(d)
    except DatasetError as e:
      raise InputError(f"--{m}_dir {d}: {e}") from None
    if not tables[m]:
      raise InputError(f"--{m}_dir {d}: no images ({', '.join(IMAGE_SUFFIXES)})")
  return _pair(tables, {m: dirs[m] for m in mods}, mods, grey_policy,
               " ".join(f"--{m}_dir {dirs[m]}" for m in mods))


def samples_from_dir(root: str, dataset, modalities: tuple[str, ...],
                     split: str | None = None, grey_policy: str = "strict"
                     ) -> list[tuple[str, dict]]:
  """Samples of a folder in the dataset's layout (labels are not needed), files matched by
  name. A folder without the layout raises InputError with the expected tree."""
  spec = get_info(dataset)
  root = os.fspath(root)
  source = f"--input_dir {root}"
  if not os.path.isdir(root):
    raise InputError(f"{source}: not a folder")
  try:
    samples = spec.layout.input_samples(root, modalities, split)
    _check_unique([(s.name, s.files[0][1]) for s in samples], source)
    return [(s.name, spec.layout.load_inputs(s, modalities, grey_policy)) for s in samples]
  except DatasetError as e:
    raise InputError(f"{source}: {e}") from None
