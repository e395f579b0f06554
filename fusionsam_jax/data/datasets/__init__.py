"""Datasets declared once: one `DatasetSpec` per dataset, and their registry.

    from fusionsam_jax.data import datasets
    spec = datasets.get("mfnet")            # classes, palette, modalities, layout, paper row
    spec.layout.list_splits(root)           # split -> samples of a folder in its layout
    datasets.register(my_spec)              # a new dataset: one spec (docs/extending.md)
    datasets.get("custom:/path/to/data")    # your own data, from its dataset.json

MFNet, FMB and VDT-2048 are the three built-in instances (``mfnet.py``, ``fmb.py``,
``vdt.py``); ``custom.py`` reads a spec from a folder's ``dataset.json``.
"""

from fusionsam_jax.data.datasets import fmb, mfnet, vdt
from fusionsam_jax.data.datasets.base import (IGNORE_INDEX, MODALITY_CHANNELS, VAL_FRACTION,
                                              DatasetSpec, Layout, PaperTable, Sample,
                                              SceneRecipe, carve_val, read_split_list)
from fusionsam_jax.data.datasets.layouts import FolderLayout, ListLayout
from fusionsam_jax.data.datasets.registry import get, names, register, resolve, unregister

for _spec in (mfnet.SPEC, fmb.SPEC, vdt.SPEC):
  register(_spec)

#: The built-in datasets' names.
BUILTIN = ("mfnet", "fmb", "vdt")


def paper_table(name) -> PaperTable | None:
  """The paper's table for dataset `name`, or None (VDT-2048, custom, unknown names)."""
  try:
    return get(name).paper
  except (ValueError, OSError):
    return None


__all__ = ["DatasetSpec", "Layout", "FolderLayout", "ListLayout", "PaperTable", "Sample",
           "SceneRecipe", "get", "names", "register", "unregister", "resolve", "paper_table",
           "carve_val", "read_split_list", "IGNORE_INDEX", "MODALITY_CHANNELS",
           "VAL_FRACTION", "BUILTIN"]
