"""FMB (RGB-infrared street scenes, 15 classes, 600 x 800).

Layout: ``{train,test}/{Visible,Infrared,Label}/<name>.png`` (Label ids 0-14, 255 = ignore;
a ``color`` folder, if present, is ignored when reading; the generator writes it).
``val`` = the last 10 % of the sorted official train names, ``train`` = the rest.
"""

from __future__ import annotations

import numpy as np

from fusionsam_jax.data.datasets.base import DatasetSpec, PaperTable, SceneRecipe
from fusionsam_jax.data.datasets.layouts import FolderLayout


class FMBLayout(FolderLayout):
  def __init__(self):
    super().__init__(
        split_dirs={"train": "train", "test": "test"},
        role_dirs={"rgb": "Visible", "thermal": "Infrared", "label": "Label"},
        extra_dirs=("color",),
        description=("  ROOT/train/Visible/<name>.png    RGB\n"
                     "  ROOT/train/Infrared/<name>.png   grey (1 channel, or 3 equal "
                     "channels)\n"
                     "  ROOT/train/Label/<name>.png      class ids 0-14 (255 = ignore)\n"
                     "  ROOT/test/{Visible,Infrared,Label}/<name>.png   likewise\n"
                     "  (a 'color' folder beside them is ignored)"))

  def extra_image(self, folder: str, element: dict) -> np.ndarray:
    return self.spec.colorize(element["label"])   # color/: the label in the palette


# FMB has no official palette in this package's sources. We use the Cityscapes colours of the
# matching classes (lamp takes Cityscapes' traffic-light colour, background is black), so masks
# look familiar next to other driving-scene results.
SPEC = DatasetSpec(
    name="fmb",
    task="semantic",
    class_names=("background", "road", "sidewalk", "building", "lamp", "sign", "vegetation",
                 "sky", "person", "car", "truck", "bus", "motorcycle", "bicycle", "pole"),
    palette=((0, 0, 0), (128, 64, 128), (244, 35, 232), (70, 70, 70), (250, 170, 30),
             (220, 220, 0), (107, 142, 35), (70, 130, 180), (220, 20, 60), (0, 0, 142),
             (0, 0, 70), (0, 60, 100), (0, 0, 230), (119, 11, 32), (153, 153, 153)),
    modalities=("rgb", "thermal"),
    native_size=(600, 800),
    splits=("train", "val", "test"),
    source="the FMB dataset linked from the SegMiF repository "
           "(https://github.com/JinyuanLiu-CV/SegMiF)",
    layout=FMBLayout(),
    paper=PaperTable(
        dataset="fmb", table="Table 2", split="test",
        columns=(("car", "Car"), ("person", "Person"), ("truck", "Truck"), ("lamp", "T-Lamp"),
                 ("sign", "T-Sign"), ("building", "Building"), ("vegetation", "Vegetation"),
                 ("pole", "Pole")),
        iou=(80.4, 59.4, 48.2, 47.3, 52.1, 85.7, 87.8, 52.0), miou=64.1),
    # Generated sets: train/test 80/20 %, val carved from train by the layout.
    generator=SceneRecipe("fmb", ("train", "train", "train", "train", "test")),
)
