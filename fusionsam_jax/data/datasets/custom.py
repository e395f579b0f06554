"""Your own data: a ``dataset.json`` next to per-modality folders and split lists.

    mydata/
      dataset.json        {"name": "mydata", "classes": ["background", "car", ...],
                           "modalities": ["rgb", "thermal"]}
      rgb/<name>.png      RGB
      thermal/<name>.png  grey (or depth/<name>.png; or both)
      labels/<name>.png   class ids 0..K-1, 1 channel (ignore_index, default 255: no label)
      train.txt test.txt  one name per line; val.txt optional (else the last 10 % of train);
                          test_day.txt + test_night.txt optional

``dataset.json`` keys: ``classes`` (required), ``modalities`` (required: "rgb" and "thermal"
and/or "depth"), ``name`` (default: the folder's name, lower-cased; the folder under
``data_dir``), ``palette`` (one [r, g, b] per class; default: a fixed palette), ``ignore_index``
(default 255), ``folders`` (role -> folder name, for "rgb", "thermal", "depth", "labels"),
``source`` (a note for messages). Any image size; names are matched by file name (stem).

The dataset's key is ``custom:<absolute folder>`` (``registry.get`` reads the file on first
use); ``configs/custom.py:/path/to/mydata`` builds a config for it.
"""

from __future__ import annotations

import json
import os
import re

from fusionsam_jax.data.datasets.base import NAME_RE, DatasetSpec
from fusionsam_jax.data.datasets.layouts import ListLayout
from fusionsam_jax.data.io import LayoutError

PREFIX = "custom:"
FILE = "dataset.json"
KEYS = ("name", "classes", "modalities", "palette", "ignore_index", "folders", "source", "task")
DEFAULT_FOLDERS = {"rgb": "rgb", "thermal": "thermal", "depth": "depth", "label": "labels"}

TEMPLATE = ('{"name": "mydata", "classes": ["background", "car", "person"], '
            '"modalities": ["rgb", "thermal"]}')


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
  """`n` distinct colours: black for class 0, then the PASCAL VOC bit-interleaved colour
  map (the palette of many segmentation tools)."""
  out = []
  for i in range(n):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    out.append((r, g, b))
  return tuple(out)


def _error(path, problem: str) -> LayoutError:
  return LayoutError(path, f"{problem} (expected e.g. {TEMPLATE}; docs/own_data.md)")


def read_spec(root) -> DatasetSpec:
  """The `DatasetSpec` of the folder `root` from its ``dataset.json``.

  Raises LayoutError (naming the file and the problem) for a missing or malformed file.
  """
  root = os.path.abspath(os.fspath(root))
  path = os.path.join(root, FILE)
  if not os.path.isdir(root):
    raise LayoutError(root, "folder does not exist (a custom dataset is a folder with "
                            f"{FILE}: docs/own_data.md)")
  if not os.path.isfile(path):
    raise _error(path, "file does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _error(path, f"cannot be read as JSON ({e})") from None
  if not isinstance(d, dict):
    raise _error(path, "expected a JSON object")
  unknown = sorted(set(d) - set(KEYS))
  if unknown:
    raise _error(path, f"unknown key(s) {unknown}; known: {list(KEYS)}")
  classes = d.get("classes")
  if not (isinstance(classes, list) and classes and all(
      isinstance(c, str) and c for c in classes)):
    raise _error(path, "'classes' must be a non-empty list of class names")
  mods = d.get("modalities")
  if not (isinstance(mods, list) and mods and mods[0] == "rgb" and len(mods) > 1
          and set(mods[1:]) <= {"thermal", "depth"} and len(set(mods)) == len(mods)):
    raise _error(path, f"'modalities' {mods!r}: expected \"rgb\" first, then \"thermal\" "
                       "and/or \"depth\"")
  name = d.get("name", re.sub(r"[^a-z0-9_]", "_", os.path.basename(root).lower()))
  if not (isinstance(name, str) and NAME_RE.match(name)):
    raise _error(path, f"'name' {name!r}: expected lower case letters, digits and '_', "
                       "starting with a letter")
  palette = d.get("palette")
  if palette is None:
    palette = default_palette(len(classes))
  elif not (isinstance(palette, list) and len(palette) == len(classes) and all(
      isinstance(c, list) and len(c) == 3 and all(
          isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette)):
    raise _error(path, f"'palette' must list one [r, g, b] (0-255) per class "
                       f"({len(classes)})")
  ignore = d.get("ignore_index", 255)
  if not (isinstance(ignore, int) and len(classes) <= ignore <= 255):
    raise _error(path, f"'ignore_index' {ignore!r}: expected an integer in "
                       f"{len(classes)}..255 (not a class id)")
  if len(classes) > 255:
    raise _error(path, f"{len(classes)} classes: at most 255 fit 8-bit labels")
  folders = d.get("folders", {})
  if not (isinstance(folders, dict) and set(folders) <= {"rgb", "thermal", "depth", "labels"}
          and all(isinstance(v, str) and v and os.sep not in v for v in folders.values())):
    raise _error(path, "'folders' maps \"rgb\", \"thermal\", \"depth\", \"labels\" to folder "
                       "names")
  task = d.get("task", "semantic")
  if task != "semantic":
    raise _error(path, f"'task' {task!r}: a custom dataset is 'semantic'")
  role_dirs = {m: folders.get(m, DEFAULT_FOLDERS[m]) for m in mods}
  role_dirs["label"] = folders.get("labels", DEFAULT_FOLDERS["label"])
  layout = ListLayout(role_dirs)
  return DatasetSpec(
      name=name, task="semantic", class_names=tuple(classes),
      palette=tuple(tuple(c) for c in palette), modalities=tuple(mods), native_size=None,
      splits=layout.splits_of(root), source=str(d.get("source", f"{root} ({FILE})")),
      layout=layout, ignore_index=ignore, key=PREFIX + root)


def key_for(root) -> str:
  """The registry key of the custom dataset in folder `root`."""
  return PREFIX + os.path.abspath(os.fspath(root))


__all__ = ["read_spec", "key_for", "default_palette", "PREFIX", "FILE"]
