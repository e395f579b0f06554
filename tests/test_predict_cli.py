"""predict's command line on bad inputs: one line, non-zero exit, nothing written (no model:
every case here is refused before the checkpoint is restored)."""

import json
import os

import numpy as np
import pytest

from _cli_helpers import tiny_config


@pytest.fixture
def workdir(tmp_path):
  """A workdir with the stored config only (configs/demo.py:tiny: rgb + thermal)."""
  from fusionsam_jax.training.guards import config_to_dict
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text(json.dumps(
      {"config": config_to_dict(tiny_config(tmp_path / "data"))}))
  return work


def _pngs(folder, names, channels=3):
  """Random 8x8 PNGs; names ending in _t.png (thermal) are grey."""
  from fusionsam_jax.data.io import write_png
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  out = []
  for n in names:
    c = 1 if n.endswith("_t.png") else channels
    arr = rng.integers(0, 255, (8, 8, c), dtype=np.uint8)
    write_png(folder / n, arr if c > 1 else arr[..., 0])
    out.append(str(folder / n))
  return out


def _run(capsys, *argv):
  from fusionsam_jax import predict
  rc = predict.main([str(a) for a in argv])
  err = capsys.readouterr().err.strip().splitlines()
  return rc, err


def test_same_basename_is_refused(workdir, tmp_path, capsys):
  """Issue 17, defect 7: a/x.png and b/x.png wrote one set of outputs and reported two."""
  (rgb_a, t_a) = _pngs(tmp_path / "a", ["x.png", "x_t.png"])
  (rgb_b, t_b) = _pngs(tmp_path / "b", ["x.png", "x_t.png"])
  out = tmp_path / "out"
  rc, err = _run(capsys, "--workdir", workdir, "--out", out, "--inputs", rgb_a, t_a, rgb_b, t_b)
  assert rc == 1 and len(err) == 1, err
  assert rgb_a in err[0] and rgb_b in err[0] and "'x'" in err[0] and "--inputs" in err[0]
  assert not out.exists()


def test_same_stem_in_an_input_dir_is_refused(workdir, tmp_path, capsys):
  """FMB layout: x.png and x.bmp are one name; the message names --input_dir, not --inputs
  (issue 17, defect 11)."""
  cfg = json.loads((workdir / "config.json").read_text())
  cfg["config"]["dataset"] = "fmb"
  (workdir / "config.json").write_text(json.dumps(cfg))
  root = tmp_path / "FMB"
  _pngs(root / "Visible", ["x.png", "x.bmp"])
  _pngs(root / "Infrared", ["x.png"], channels=1)
  rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", "--input_dir", root)
  assert rc == 1 and len(err) == 1, err
  assert f"--input_dir {root}" in err[0] and "--inputs" not in err[0] and "both named" in err[0]


def test_incomplete_group_from_input_dir_names_input_dir(workdir, tmp_path, capsys):
  from fusionsam_jax import predict
  files = _pngs(tmp_path / "i", ["a.png"])
  with pytest.raises(predict.InputError) as e:
    predict.samples_from_files(files, ("rgb", "thermal"), source=f"--input_dir {tmp_path}")
  assert str(e.value).startswith(f"--input_dir {tmp_path}:") and "incomplete" in str(e.value)


def test_out_naming_a_file_is_refused(workdir, tmp_path, capsys):
  """Issue 17, defect 9: a traceback (FileExistsError / NotADirectoryError) before."""
  rgb, t = _pngs(tmp_path / "a", ["x.png", "x_t.png"])
  f = tmp_path / "taken.txt"
  f.write_text("keep")
  for out in (f, f / "sub"):
    rc, err = _run(capsys, "--workdir", workdir, "--out", out, "--inputs", rgb, t)
    assert rc == 1 and len(err) == 1 and str(f) in err[0] and "file" in err[0], err
  assert f.read_text() == "keep"
  assert sorted(os.listdir(tmp_path)) == ["a", "taken.txt", "work"]


def test_usage_errors(workdir, tmp_path, capsys):
  rgb, t = _pngs(tmp_path / "a", ["x.png", "x_t.png"])
  for argv, needle in (
      (["--out", tmp_path / "o"], "exactly one of --inputs and --input_dir"),
      (["--out", tmp_path / "o", "--inputs", rgb, "--input_dir", tmp_path], "exactly one"),
      (["--out", tmp_path / "o", "--inputs", rgb, "--split", "test"], "--split needs"),
      (["--inputs", rgb], "--out is required")):
    rc, err = _run(capsys, "--workdir", workdir, *argv)
    assert rc == 2 and len(err) == 1 and needle in err[0], err
