"""MFNet (RGB-T urban scenes, 9 classes, 480 x 640): one 4-channel PNG per sample.

Layout: ``images/<name>.png`` (RGB + thermal as channel 4), ``labels/<name>.png`` (ids 0-8),
split lists ``train.txt val.txt test.txt`` (+ ``test_day.txt test_night.txt``; when absent
they are derived from the name suffix ``D`` / ``N`` of the test names).
"""

from __future__ import annotations

import os

import numpy as np

from fusionsam_jax.data.datasets.base import (DatasetSpec, Layout, PaperTable, Sample,
                                              SceneRecipe, check_sizes, image_table,
                                              read_split_list, write_split_list)
from fusionsam_jax.data.io import (ChannelError, MissingFileError, SplitListError, read_image,
                                   write_png)


class MFNetLayout(Layout):
  """RGB + thermal in one 4-channel PNG; split lists; day/night lists or D/N suffixes."""

  description = ("  ROOT/images/<name>.png   4-channel uint8 PNG: RGB + thermal as channel 4\n"
                 "  ROOT/labels/<name>.png   single-channel class ids 0-8 (255 = ignore)\n"
                 "  ROOT/train.txt ROOT/val.txt ROOT/test.txt   one name per line, e.g. 00001D\n"
                 "  ROOT/test_day.txt ROOT/test_night.txt       optional (else derived from "
                 "the D/N suffix)")
  split_files = ("train", "val", "test")

  def list_splits(self, root) -> dict[str, list[Sample]]:
    root = os.fspath(root)
    self.require_dir(root)
    for sub in ("images", "labels"):
      self.require_dir(os.path.join(root, sub))
    lists = {}
    for split in self.split_files:
      path = os.path.join(root, f"{split}.txt")
      if not os.path.isfile(path):
        raise self.layout_error(path, "split list does not exist")
      lists[split] = read_split_list(path)
    owner = {}
    for split, names in lists.items():
      for name in names:
        if name in owner:
          raise SplitListError(os.path.join(root, f"{split}.txt"),
                               f"{name!r} is also in {owner[name]}.txt (splits overlap)")
        owner[name] = split
    test = set(lists["test"])
    for split, suffix in (("test_day", "D"), ("test_night", "N")):
      path = os.path.join(root, f"{split}.txt")
      if os.path.isfile(path):
        names = read_split_list(path)
        extra = [n for n in names if n not in test]
        if extra:
          raise SplitListError(path, f"{extra[0]!r} is not in test.txt")
      else:
        names = [n for n in lists["test"] if n.endswith(suffix)]
      lists[split] = names
    if not os.path.isfile(os.path.join(root, "test_day.txt")) or not os.path.isfile(
            os.path.join(root, "test_night.txt")):
      odd = [n for n in lists["test"] if not n.endswith(("D", "N"))]
      if odd:
        raise SplitListError(os.path.join(root, "test.txt"),
                             f"{odd[0]!r} has no D/N suffix, and test_day.txt / "
                             "test_night.txt are missing to say which it is")
    return {split: [self.sample(root, n) for n in sorted(names)]
            for split, names in lists.items()}

  @staticmethod
  def sample(root, name: str) -> Sample:
    return Sample(name, (("image", os.path.join(root, "images", f"{name}.png")),
                         ("label", os.path.join(root, "labels", f"{name}.png"))))

  def _image(self, path) -> np.ndarray:
    image = read_image(path)
    if image.shape[-1] != 4:
      raise ChannelError(path, f"expected 4 channels (RGB + thermal as channel 4), got "
                               f"{image.shape[-1]}")
    return image

  def load(self, sample: Sample, grey_policy: str = "strict") -> dict:
    img_path, lab_path = sample.file("image"), sample.file("label")
    image = self._image(img_path)
    raw_label = read_image(lab_path, palette_indices=True)
    check_sizes({"image": (img_path, image), "label": (lab_path, raw_label)})
    label = self.make_label(raw_label, lab_path)
    return {"rgb": np.ascontiguousarray(image[..., :3]),
            "thermal": np.ascontiguousarray(image[..., 3:]),
            "label": label, "name": sample.name}

  def input_samples(self, root, modalities, split=None) -> list[Sample]:
    root = os.fspath(root)
    img_dir = os.path.join(root, "images")
    if not os.path.isdir(img_dir):
      raise self.layout_error(img_dir, "folder does not exist (give --input_dir the dataset "
                                       "root, or pass per-modality inputs: --rgb_dir / "
                                       "--thermal_dir)")
    table = image_table(img_dir)
    if split:
      lst = os.path.join(root, f"{split}.txt")
      if not os.path.isfile(lst):
        raise self.layout_error(lst, f"no split list for split {split!r}")
      names = read_split_list(lst)
      missing = [n for n in names if n not in table]
      if missing:
        raise MissingFileError(os.path.join(img_dir, f"{missing[0]}.png"),
                               f"listed in {lst} but missing ({len(missing)} in all)")
    else:
      names = sorted(table)
    if not names:
      raise self.layout_error(img_dir, "no images found")
    return [Sample(n, (("image", table[n]),)) for n in names]

  def load_inputs(self, sample: Sample, modalities, grey_policy: str = "strict") -> dict:
    path = sample.file("image")
    image = self._image(path)
    parts = {"rgb": np.ascontiguousarray(image[..., :3]),
             "thermal": np.ascontiguousarray(image[..., 3:])}
    return {m: parts[m] for m in modalities}

  def folders(self) -> list[str]:
    return ["images", "labels"]

  def write_sample(self, root: str, element: dict, split: str) -> None:
    name = element["name"]
    write_png(os.path.join(root, "images", f"{name}.png"),
              np.concatenate([element["rgb"], element["thermal"]], axis=-1))
    write_png(os.path.join(root, "labels", f"{name}.png"), element["label"])

  def write_splits(self, root: str, splits: dict[str, list[str]]) -> None:
    for s, names in splits.items():
      write_split_list(os.path.join(root, f"{s}.txt"), names)


SPEC = DatasetSpec(
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
    layout=MFNetLayout(),
    paper=PaperTable(
        dataset="mfnet", table="Table 1", split="test",
        columns=(("unlabeled", "Unlabeled"), ("car", "Car"), ("person", "Person"),
                 ("bike", "Bike"), ("curve", "Curve"), ("car_stop", "Car Stop"),
                 ("guardrail", "Guardrail"), ("color_cone", "Color Cone"), ("bump", "Bump")),
        iou=(98.7, 89.6, 76.2, 75.8, 69.6, 50.1, 10.2, 47.6, 61.4), miou=64.4),
    # Generated sets: train/val/test 50/25/25 %; day and night alternate with the index.
    generator=SceneRecipe("mfnet", ("train", "train", "train", "train", "val", "val", "test",
                                    "test"), night_suffix=True),
)
