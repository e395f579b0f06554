"""VDT-2048 (visible + depth + thermal salient objects, 480 x 640).

Layout: ``{Train,Test}/{V,D,T,GT}/<name>.png``; label = ``GT > 127`` as {0, 1}. ``val`` = the
last 10 % of the sorted official Train names, ``train`` = the rest.
"""

from __future__ import annotations

import numpy as np

from fusionsam_jax.data.datasets.base import DatasetSpec, SceneRecipe
from fusionsam_jax.data.datasets.layouts import FolderLayout
from fusionsam_jax.data.io import to_grey


class VDTLayout(FolderLayout):
  label_is_ids = False

  def __init__(self):
    super().__init__(
        split_dirs={"train": "Train", "test": "Test"},
        role_dirs={"rgb": "V", "depth": "D", "thermal": "T", "label": "GT"},
        description=("  ROOT/Train/V/<name>.png    visible RGB\n"
                     "  ROOT/Train/D/<name>.png    depth, grey (1 channel, or 3 equal "
                     "channels)\n"
                     "  ROOT/Train/T/<name>.png    thermal, grey (likewise)\n"
                     "  ROOT/Train/GT/<name>.png   saliency mask (salient where > 127)\n"
                     "  ROOT/Test/{V,D,T,GT}/<name>.png   likewise"))

  def make_label(self, raw: np.ndarray, path) -> np.ndarray:
    return (to_grey(raw, path, "strict")[..., 0] > 127).astype(np.uint8)

  def label_image(self, label: np.ndarray) -> np.ndarray:
    return label * np.uint8(255)


# VDT-2048 images are 640 x 480 (width x height).
SPEC = DatasetSpec(
    name="vdt",
    task="saliency",
    class_names=("background", "salient"),
    palette=((0, 0, 0), (255, 255, 255)),
    modalities=("rgb", "depth", "thermal"),
    native_size=(480, 640),
    splits=("train", "val", "test"),
    source="the VDT-2048 release linked from https://github.com/VDT-2048/VDT-Dataset",
    layout=VDTLayout(),
    aliases=("vdt2048",),
    # Generated sets: Train/Test 50/50 %, val carved from Train by the layout.
    generator=SceneRecipe("vdt", ("train", "train", "test", "test")),
)
