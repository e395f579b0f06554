"""Generated scenes: determinism, layouts, every class present, fusion-relevant statistics."""

import filecmp
import os

import numpy as np
import pytest

from fusionsam_jax.cli import generate as generate_cli
from fusionsam_jax.data import generate
from fusionsam_jax.data.datasets import get as get_info

H, W = 48, 64


def _tree(root):
  out = []
  for d, _, files in os.walk(root):
    out += [os.path.relpath(os.path.join(d, f), root) for f in files]
  return sorted(out)


@pytest.mark.parametrize("layout", ["mfnet", "fmb", "vdt"])
def test_same_seed_identical_bytes(tmp_path, layout):
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  generate.generate_dataset(layout, a, 10, seed=7, height=H, width=W)
  generate.generate_dataset(layout, b, 10, seed=7, height=H, width=W)
  generate.generate_dataset(layout, c, 10, seed=8, height=H, width=W)
  files = _tree(a)
  assert files == _tree(b) == _tree(c) and len(files) > 20
  _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
  assert not mismatch and not errors
  _, mismatch, _ = filecmp.cmpfiles(a, c, files, shallow=False)
  assert any(f.endswith(".png") for f in mismatch)  # another seed, other scenes


def test_sample_does_not_depend_on_num():
  a = generate.generate_scene("mfnet", 3, seed=1, height=H, width=W)
  b = generate.generate_elements("mfnet", 6, seed=1, height=H, width=W)[3]
  for k in ("rgb", "thermal", "label"):
    np.testing.assert_array_equal(a[k], b[k])


def test_official_layouts(tmp_path):
  splits = generate.generate_dataset("mfnet", tmp_path / "m", 16, seed=0, height=H, width=W)
  m = tmp_path / "m"
  for s in ("train", "val", "test", "test_day", "test_night"):
    assert (m / f"{s}.txt").read_text().split() == splits[s]
  assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 4, 4]
  assert all(n.endswith("D") for n in splits["test_day"])
  assert all(n.endswith("N") for n in splits["test_night"])
  assert len(os.listdir(m / "images")) == len(os.listdir(m / "labels")) == 16
  generate.generate_dataset("fmb", tmp_path / "f", 10, seed=0, height=H, width=W)
  for sub in ("Visible", "Infrared", "Label", "color"):
    assert len(os.listdir(tmp_path / "f" / "train" / sub)) == 8
    assert len(os.listdir(tmp_path / "f" / "test" / sub)) == 2
  generate.generate_dataset("vdt", tmp_path / "v", 8, seed=0, height=H, width=W)
  for sub in ("V", "D", "T", "GT"):
    assert len(os.listdir(tmp_path / "v" / "Train" / sub)) == 4
    assert len(os.listdir(tmp_path / "v" / "Test" / sub)) == 4
  with pytest.raises(FileExistsError):
    generate.generate_dataset("vdt", tmp_path / "v", 8, seed=0, height=H, width=W)


@pytest.mark.parametrize("layout,num", [("mfnet", 48), ("fmb", 45), ("vdt", 16)])
def test_every_class_in_every_split(layout, num):
  info = get_info(layout)
  for split, idx in generate.split_indices(layout, num).items():
    if (split == "val" and layout == "fmb") or split.startswith("test_"):
      continue  # too few images in these small splits
    labels = [generate.generate_scene(layout, i, 0, H, W)["label"] for i in idx]
    assert set(np.unique(np.concatenate([x.ravel() for x in labels]))) == \
        set(range(info.num_classes)), split


def _pixels(layout, num, night):
  els = [generate.generate_scene(layout, i, 0, H, W) for i in range(num)]
  els = [e for i, e in enumerate(els) if generate.is_night(i) == night]
  lab = np.concatenate([e["label"].ravel() for e in els])
  rgb = np.concatenate([e["rgb"].reshape(-1, 3) for e in els]).astype(int)
  th = np.concatenate([e["thermal"].ravel() for e in els]).astype(int)
  return lab, rgb, th


def test_mfnet_scenes_need_both_modalities():
  warm, cold = [1, 2, 3], [4, 5, 6, 7, 8]
  for night in (False, True):
    lab, rgb, th = _pixels("mfnet", 32, night)
    is_warm, is_cold = np.isin(lab, warm), np.isin(lab, cold)
    # thermal: warm classes hot, cold classes as cool as the background
    assert (th[is_warm] > 118).mean() > 0.97
    assert (th[is_cold | (lab == 0)] < 118).mean() > 0.99
    # RGB: cold classes are coloured (saturated), by day and at night
    sat = rgb.max(1) - rgb.min(1)
    assert np.median(sat[is_cold]) > 60
# at night warm things are as dark as the background in RGB (visible only in thermal)
  lab, rgb, _ = _pixels("mfnet", 32, True)
  assert abs(rgb[np.isin(lab, warm)].mean() - rgb[lab == 0].mean()) < 10


def test_vdt_salient_objects_pop_out_somewhere():
  for i in range(14):
    e = generate.generate_scene("vdt", i, 0, H, W)
    obj = e["label"] == 1
    assert obj.any()
    seen = []
    sat = e["rgb"].max(-1).astype(int) - e["rgb"].min(-1)
    seen.append(np.median(sat[obj]) > 100)
    seen.append(np.median(e["depth"][..., 0][obj]) > 160)
    seen.append(np.median(e["thermal"][..., 0][obj]) > 160)
    assert 1 <= sum(seen), i


def test_cli(tmp_path, capsys):
  rc = generate_cli.main(["--layout", "fmb", "--out", str(tmp_path / "g"), "--num", "5",
                      "--seed", "1", "--height", "32", "--width", "40", "--noprogress"])
  assert rc == 0 and "train=3, val=1, test=1" in capsys.readouterr().out
  rc = generate_cli.main(["--layout", "fmb", "--out", str(tmp_path / "g"), "--num", "5",
                      "--noprogress"])
  assert rc == 1 and "exists" in capsys.readouterr().err


def test_overwrite_replaces_only_a_generated_folder(tmp_path):
  """Issue 37 item 1: --overwrite deleted any existing folder with its contents."""
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("not generated")
  rc = generate_cli.main(["--layout", "mfnet", "--out", str(mine), "--num", "4",
                          "--overwrite", "--noprogress"])
  assert rc == 1 and (mine / "thesis.tex").read_text() == "not generated"
  out = tmp_path / "gen"
  assert generate_cli.main(["--layout", "mfnet", "--out", str(out), "--num", "4",
                            "--noprogress"]) == 0
  assert generate_cli.main(["--layout", "mfnet", "--out", str(out), "--num", "6",
                            "--overwrite", "--noprogress"]) == 0
  assert '"num": 6' in (out / "generated.json").read_text()
  target = tmp_path / "target"
  target.mkdir()
  (target / "keep.txt").write_text("x")
  link = tmp_path / "link"
  link.symlink_to(target)
  assert generate_cli.main(["--layout", "mfnet", "--out", str(link), "--num", "4",
                            "--overwrite", "--noprogress"]) == 1
  assert (target / "keep.txt").exists()
  # A killed generator's temporary folder (a pid that no longer runs) is cleaned up.
  stale = tmp_path / ".gen-generating-999999-abcdefgh"
  stale.mkdir()
  assert generate_cli.main(["--layout", "mfnet", "--out", str(out), "--num", "4",
                            "--overwrite", "--noprogress"]) == 0
  assert not stale.exists()
