"""TFDS builders: generated fixtures in each official layout -> ArrayRecord -> data source."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fusionsam_jax.cli import prepare as prepare_cli
from fusionsam_jax.data import generate, prepare
from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.data.sources import load_source

H, W = 40, 56
NUM = {"mfnet": 16, "fmb": 20, "vdt": 12}
REAL_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "mfnet_real")


@pytest.fixture(scope="module", params=["mfnet", "fmb", "vdt"])
def built(request, tmp_path_factory):
  layout = request.param
  root = tmp_path_factory.mktemp(layout)
  src, dst = root / "src", root / "dst"
  splits = generate.generate_dataset(layout, src, NUM[layout], seed=5, height=H, width=W)
  prepare.prepare_dataset(layout, src, dst, progress=False)
  return layout, src, dst, splits


def _png(path):
  return np.asarray(Image.open(path))


def _files(layout, src, name, split):
  if layout == "mfnet":
    img = _png(src / "images" / f"{name}.png")
    return {"rgb": img[..., :3], "thermal": img[..., 3:],
            "label": _png(src / "labels" / f"{name}.png")}
  if layout == "fmb":
    d = src / ("test" if split == "test" else "train")
    return {"rgb": _png(d / "Visible" / f"{name}.png"),
            "thermal": _png(d / "Infrared" / f"{name}.png")[..., None],
            "label": _png(d / "Label" / f"{name}.png")}
  d = src / ("Test" if split == "test" else "Train")
  return {"rgb": _png(d / "V" / f"{name}.png"), "depth": _png(d / "D" / f"{name}.png")[..., None],
          "thermal": _png(d / "T" / f"{name}.png")[..., None],
          "label": (_png(d / "GT" / f"{name}.png") > 127).astype(np.uint8)}


def test_split_counts_and_names(built):
  layout, _, dst, splits = built
  info = get_info(layout)
  assert prepare.split_sizes(layout, dst) == {s: len(splits[s]) for s in info.splits}
  for split in info.splits:
    ds = load_source(layout, split, dst)
    assert [ds[i]["name"].decode() for i in range(len(ds))] == sorted(splits[split])
# val is never carved from test; train and val together are the official train set
  assert not set(splits["val"]) & set(splits["test"])
  assert not set(splits["train"]) & set(splits["val"])
  assert len(load_source(layout, "train+val", dst)) == len(splits["train"]) + len(splits["val"])


def test_elements_round_trip_byte_identical(built):
  layout, src, dst, splits = built
  info = get_info(layout)
  for split in ("train", "val", "test"):
    ds = load_source(layout, split, dst)
    for i in range(len(ds)):
      el = ds[i]
      assert set(el) == set(info.modalities) | {"label", "name"}
      name = el["name"].decode()
      ref = _files(layout, src, name, split)
      for k in info.modalities:
        want = (H, W, 3 if k == "rgb" else 1)
        assert el[k].dtype == np.uint8 and el[k].shape == want, (k, el[k].shape)
        np.testing.assert_array_equal(el[k], ref[k])
      assert el["label"].dtype == np.uint8 and el["label"].shape == (H, W)
      np.testing.assert_array_equal(el["label"], ref["label"])
      ids = np.unique(el["label"])
      assert ids.max() < info.num_classes or ids.max() == 255


def test_mfnet_day_night_splits(built):
  layout, _, dst, splits = built
  if layout != "mfnet":
    pytest.skip("MFNet only")
  day = [n.decode() for n in (e["name"] for e in load_source("mfnet", "test_day", dst))]
  night = [n.decode() for n in (e["name"] for e in load_source("mfnet", "test_night", dst))]
  assert day and night and all(n.endswith("D") for n in day)
  assert all(n.endswith("N") for n in night)
  assert sorted(day + night) == sorted(splits["test"])


def test_prepare_if_exists(built, tmp_path):
  layout, src, dst, _ = built
  with pytest.raises(FileExistsError):
    prepare.prepare_dataset(layout, src, dst, progress=False)
  assert prepare.prepare_dataset(layout, src, dst, if_exists="skip", progress=False) == \
      prepare.dataset_dir(layout, dst)
  # nothing but the dataset is left in the output root (no temp or download folders)
  assert sorted(os.listdir(dst)) == [layout]


def test_real_mfnet_frames_decode(tmp_path):
  """The two real MFNet frames: RGB = PIL channels R, G, B; thermal = channel 4."""
  names = sorted(f[:-4] for f in os.listdir(REAL_DIR))
  src = tmp_path / "src"
  (src / "images").mkdir(parents=True)
  (src / "labels").mkdir()
  for n in names:
    shutil.copy(os.path.join(REAL_DIR, f"{n}.png"), src / "images" / f"{n}.png")
    Image.fromarray(np.zeros((480, 640), np.uint8)).save(src / "labels" / f"{n}.png")
  (src / "train.txt").write_text(names[0] + "\n")
  (src / "val.txt").write_text(names[1] + "\n")
  (src / "test.txt").write_text("00998D\n00999N\n")  # copies, so test_day/night exist
  for n in ("00998D", "00999N"):
    shutil.copy(os.path.join(REAL_DIR, f"{names[1]}.png"), src / "images" / f"{n}.png")
    shutil.copy(src / "labels" / f"{names[1]}.png", src / "labels" / f"{n}.png")
  prepare.prepare_dataset("mfnet", src, tmp_path / "dst", progress=False)
  for split, name in (("train", names[0]), ("val", names[1])):
    el = load_source("mfnet", split, tmp_path / "dst")[0]
    assert el["name"].decode() == name
    with Image.open(os.path.join(REAL_DIR, f"{name}.png")) as img:
      assert img.mode == "RGBA" and img.size == (640, 480)
      r, g, b, t = (np.asarray(c) for c in img.split())
    assert el["rgb"].shape == (480, 640, 3) and el["thermal"].shape == (480, 640, 1)
    np.testing.assert_array_equal(el["rgb"], np.stack([r, g, b], -1))
    np.testing.assert_array_equal(el["thermal"][..., 0], t)
    assert el["thermal"].std() > 1  # a real thermal channel, not a constant alpha


def test_grey_stored_as_rgb_is_reduced(tmp_path):
  """Thermal / depth PNGs with 3 equal channels become (H, W, 1)."""
  src = tmp_path / "src"
  generate.generate_dataset("vdt", src, 4, seed=1, height=H, width=W)
  for sub in ("D", "T"):
    for f in (src / "Train" / sub).iterdir():
      g = _png(f)
      Image.fromarray(np.repeat(g[..., None], 3, -1)).save(f)
  prepare.prepare_dataset("vdt", src, tmp_path / "dst", progress=False)
  ds = load_source("vdt", "train+val", tmp_path / "dst")
  el = ds[0]
  assert el["depth"].shape == (H, W, 1) and el["thermal"].shape == (H, W, 1)
  stored = _png(src / "Train" / "D" / f"{el['name'].decode()}.png")
  assert stored.shape == (H, W, 3)
  np.testing.assert_array_equal(el["depth"][..., 0], stored[..., 0])


def test_cli(tmp_path, capsys):
  src = tmp_path / "src"
  generate.generate_dataset("mfnet", src, 8, seed=0, height=H, width=W)
  rc = prepare_cli.main(["--dataset", "mfnet", "--manual_dir", str(src), "--data_dir",
                     str(tmp_path / "dst"), "--noprogress"])
  assert rc == 0
  assert "train=4" in capsys.readouterr().out
