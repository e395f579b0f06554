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
  from fusionsam_jax.cli import predict
  from fusionsam_jax.data import inputs
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


def test_a_file_that_is_not_a_whole_sample_names_its_source(workdir, tmp_path, capsys):
  """Separate files are never grouped by order: an RGB file alone is not an RGB + thermal
  sample; the message names the flag and points at the per-modality flags."""
  from fusionsam_jax.cli import predict
  from fusionsam_jax.data import inputs
  files = _pngs(tmp_path / "i", ["a.png"])
  with pytest.raises(inputs.InputError) as e:
    inputs.samples_from_files(files, ("rgb", "thermal"), source=f"--input_dir {tmp_path}")
  assert str(e.value).startswith(f"--input_dir {tmp_path}:") and "not a whole" in str(e.value)
  assert "--rgb PATH --thermal PATH" in str(e.value)


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
      (["--out", tmp_path / "o"], "exactly one of --inputs, --input_dir"),
      (["--out", tmp_path / "o", "--inputs", rgb, "--input_dir", tmp_path], "exactly one"),
      (["--out", tmp_path / "o", "--inputs", rgb, "--split", "test"], "--split needs"),
      (["--inputs", rgb], "--out is required")):
    rc, err = _run(capsys, "--workdir", workdir, *argv)
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_plain_folder_is_refused_with_the_expected_tree(workdir, tmp_path, capsys):
  """Issue 31 item 1: a folder of RGB PNGs without the layout was paired two files at a time
  as (rgb, thermal), exit 0. Now: refused, the message shows MFNet's tree, also with
  --grey_policy luma; nothing is written."""
  plain = tmp_path / "plain"
  _pngs(plain, [f"{i:02d}.png" for i in range(10)])
  for extra in ([], ["--grey_policy", "luma"]):
    rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", "--input_dir",
                   plain, *extra)
    assert rc == 1, err
    assert err[0].startswith(f"error: --input_dir {plain}: {plain / 'images'}: folder does not "
                             "exist"), err
    assert "--rgb_dir" in err[0] and any("ROOT/images/<name>.png" in e for e in err), err
    assert not any("Traceback" in e for e in err)
  assert not (tmp_path / "out").exists()


def test_colour_thermal_is_refused_naming_the_file(workdir, tmp_path, capsys):
  rgb, = _pngs(tmp_path / "rgb", ["x.png"])
  colour, = _pngs(tmp_path / "ir", ["x.png"])       # 3 channels that differ
  for argv in (["--rgb", rgb, "--thermal", colour],
               ["--rgb_dir", tmp_path / "rgb", "--thermal_dir", tmp_path / "ir"]):
    rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", *argv)
    assert rc == 1 and len(err) == 1, err
    assert colour in err[0] and "expected a grey image" in err[0] and "luma" not in err[0]
  assert not (tmp_path / "out").exists()


def test_unmatched_names_are_refused_naming_them(workdir, tmp_path, capsys):
  _pngs(tmp_path / "rgb", ["a.png", "b.png", "c.png"])
  _pngs(tmp_path / "ir", ["a_t.png", "b_t.png"])
  rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", "--rgb_dir",
                 tmp_path / "rgb", "--thermal_dir", tmp_path / "ir")
  assert rc == 1 and len(err) == 1, err
  assert "no thermal image" in err[0] and "a, b, c" in err[0] and str(tmp_path / "ir") in err[0]
  # Files given per modality: two or more are paired by name too.
  rgb = _pngs(tmp_path / "r2", ["a.png", "b.png"])
  ir = _pngs(tmp_path / "i2", ["a_t.png", "c_t.png"], channels=1)
  os.rename(ir[0], tmp_path / "i2" / "a.png")
  rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", "--rgb", rgb[0],
                 "--rgb", rgb[1], "--thermal", tmp_path / "i2" / "a.png", "--thermal", ir[1])
  assert rc == 1 and len(err) == 1 and "c_t" in err[0] and "no rgb image" in err[0], err
  # A modality the run does not read, or one it lacks.
  rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", "--rgb", rgb[0])
  assert rc == 1 and "missing --thermal" in err[0], err
  rc, err = _run(capsys, "--workdir", workdir, "--out", tmp_path / "out", "--rgb", rgb[0],
                 "--thermal", tmp_path / "i2" / "a.png", "--depth", rgb[1])
  assert rc == 1 and "unexpected --depth" in err[0], err
  assert not (tmp_path / "out").exists()
