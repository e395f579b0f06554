"""Dataset info: classes, palettes, modalities, splits."""

import numpy as np
import pytest

from fusionsam_jax import data
from fusionsam_jax.data.datasets import get as get_info


def test_mfnet_facts():
  info = get_info("mfnet")
  assert info.class_names[1] == "car" and info.class_names[8] == "bump"
  assert info.num_classes == 9 and info.ignore_index == 255
  assert info.palette[1] == (64, 0, 128) and info.palette[8] == (192, 64, 0)
  assert info.modalities == ("rgb", "thermal") and info.native_size == (480, 640)
  assert info.splits == ("train", "val", "test", "test_day", "test_night")


@pytest.mark.parametrize("name,n,mods", [("fmb", 15, ("rgb", "thermal")),
                                         ("vdt", 2, ("rgb", "depth", "thermal"))])
def test_other_facts(name, n, mods):
  info = get_info(name)
  assert info.num_classes == n and info.modalities == mods
  assert len(set(info.palette)) == n  # distinct colours
  assert "val" in info.splits and "test" in info.splits


def test_aliases_and_unknown():
  assert get_info("VDT-2048") is get_info("vdt")
  with pytest.raises(ValueError, match="mfnet"):
    get_info("cityscapes")


def test_colorize():
  info = get_info("mfnet")
  rgb = info.colorize(np.array([[0, 1], [8, 255]], np.uint8))
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  assert tuple(rgb[0, 1]) == (64, 0, 128) and tuple(rgb[1, 1]) == (0, 0, 0)


def test_package_exports():
  assert data.get_info is get_info
  assert callable(data.train_loader) and callable(data.prepare_dataset)
  assert issubclass(data.MissingFileError, data.DatasetError)
  assert issubclass(data.DatasetError, ValueError)
