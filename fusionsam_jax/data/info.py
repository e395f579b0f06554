"""Static facts about the supported datasets (classes, palettes, modalities, splits).

Generated scene sets (``fusionsam_jax.data.generate``) use exactly the same layouts, and so the
same info, as the real datasets they imitate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_INDEX = 255

#: Channels of each modality in a pipeline element (channels-last, uint8).
MODALITY_CHANNELS = {"rgb": 3, "thermal": 1, "depth": 1}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about one dataset.

  Attributes:
      name: registry name ("mfnet", "fmb", "vdt").
      task: "semantic" (per-pixel class ids) or "saliency" (binary {0, 1} masks).
      class_names: one name per class id (id = position).
      palette: one RGB colour per class id, for colour-coded masks.
      modalities: image keys of an element, RGB first.
      native_size: (height, width) of the official images.
      splits: split names a prepared dataset has.
      ignore_index: label value that carries no supervision (never a class id).
      source: where to get the official data (for error messages and docs).
  """

  name: str
  task: str
  class_names: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  modalities: tuple[str, ...]
  native_size: tuple[int, int]
  splits: tuple[str, ...]
  source: str
  ignore_index: int = IGNORE_INDEX

  def __post_init__(self):
    if len(self.palette) != len(self.class_names):
      raise ValueError(f"{self.name}: {len(self.palette)} palette colours for "
                       f"{len(self.class_names)} classes")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def aux_modalities(self) -> tuple[str, ...]:
    """The modalities other than RGB (thermal and/or depth)."""
    return tuple(m for m in self.modalities if m != "rgb")

  def palette_array(self) -> np.ndarray:
    """uint8 (256, 3) lookup table: class id -> colour; every other value (255 too) is black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: self.num_classes] = np.asarray(self.palette, np.uint8)
    return lut

  def colorize(self, label: np.ndarray) -> np.ndarray:
    """Maps a label map (..., H, W) of class ids to RGB (..., H, W, 3) uint8."""
    return self.palette_array()[np.asarray(label).astype(np.uint8)]


MFNET = DatasetInfo(
    name="mfnet",
    task="semantic",
    class_names=("unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail",
                 "color_cone", "bump"),
    palette=((0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0),
             (64, 64, 128), (192, 128, 128), (192, 64, 0)),
    modalities=("rgb", "thermal"),
    native_size=(480, 640),
    splits=("train", "val", "test", "test_day", "test_night"),
    source="the MFNet release linked from RTFNet's README (https://github.com/yuxiangsun/RTFNet)",
)

# FMB has no official palette in this package's sources. We use the Cityscapes colours of the
# matching classes (lamp takes Cityscapes' traffic-light colour, background is black), so masks
# look familiar next to other driving-scene results.
FMB = DatasetInfo(
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
)

# VDT-2048 images are 640 x 480 (width x height).
VDT = DatasetInfo(
    name="vdt",
    task="saliency",
    class_names=("background", "salient"),
    palette=((0, 0, 0), (255, 255, 255)),
    modalities=("rgb", "depth", "thermal"),
    native_size=(480, 640),
    splits=("train", "val", "test"),
    source="the VDT-2048 release linked from https://github.com/VDT-2048/VDT-Dataset",
)

_INFOS = {i.name: i for i in (MFNET, FMB, VDT)}


@dataclasses.dataclass(frozen=True)
class PaperTable:
  """The FusionSAM row of one of the paper's result tables (KDD '25, Sec. 4.3).

  Attributes:
      dataset: registry name.
      table: "Table 1" / "Table 2".
      split: the split the paper reports ("test").
      columns: ``(class_name, header)`` pairs in the paper's column order (the class names
          are this package's; the headers are the paper's).
      iou: FusionSAM's per-column IoU in percent, as printed in the paper.
      miou: FusionSAM's mIoU in percent, as printed (over all classes, also where the table
          shows only some of them, as Table 2 does).
  """

  dataset: str
  table: str
  split: str
  columns: tuple[tuple[str, str], ...]
  iou: tuple[float, ...]
  miou: float

  def iou_by_class(self) -> dict[str, float]:
    """class name -> IoU in percent."""
    return {c: v for (c, _), v in zip(self.columns, self.iou)}


#: The paper's FusionSAM rows ("Ours" in Tables 1 and 2), per dataset. VDT-2048 (saliency)
#: has no per-class table.
PAPER_TABLES = {
    "mfnet": PaperTable(
        dataset="mfnet", table="Table 1", split="test",
        columns=(("unlabeled", "Unlabeled"), ("car", "Car"), ("person", "Person"),
                 ("bike", "Bike"), ("curve", "Curve"), ("car_stop", "Car Stop"),
                 ("guardrail", "Guardrail"), ("color_cone", "Color Cone"), ("bump", "Bump")),
        iou=(98.7, 89.6, 76.2, 75.8, 69.6, 50.1, 10.2, 47.6, 61.4), miou=64.4),
    "fmb": PaperTable(
        dataset="fmb", table="Table 2", split="test",
        columns=(("car", "Car"), ("person", "Person"), ("truck", "Truck"), ("lamp", "T-Lamp"),
                 ("sign", "T-Sign"), ("building", "Building"), ("vegetation", "Vegetation"),
                 ("pole", "Pole")),
        iou=(80.4, 59.4, 48.2, 47.3, 52.1, 85.7, 87.8, 52.0), miou=64.1),
}


def paper_table(name: str) -> PaperTable | None:
  """The paper's table for dataset ``name``, or None (VDT-2048, unknown names)."""
  try:
    return PAPER_TABLES.get(get_info(name).name)
  except ValueError:
    return None
DATASETS = tuple(_INFOS)


def get_info(name: str) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of ``name`` ("mfnet", "fmb" or "vdt"; "vdt2048" too)."""
  key = name.lower().replace("-", "").replace("_", "")
  key = {"vdt2048": "vdt"}.get(key, key)
  if key not in _INFOS:
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
  return _INFOS[key]
