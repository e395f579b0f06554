"""Bad inputs raise a specific DatasetError naming the file, before anything is written."""

import os

import numpy as np
import pytest
from PIL import Image

from fusionsam_jax.cli import prepare as prepare_cli
from fusionsam_jax.data import builders, generate, prepare
from fusionsam_jax.data.io import (ChannelError, CorruptImageError, DatasetError, LabelRangeError,
                                   LayoutError, MissingFileError, SizeMismatchError,
                                   SplitListError)

H, W = 32, 48


def _make(tmp_path, layout, num=8):
  src = tmp_path / "src"
  generate.generate_dataset(layout, src, num, seed=2, height=H, width=W)
  return src


def _expect(tmp_path, layout, src, exc, needle, **kw):
  dst = tmp_path / "dst"
  with pytest.raises(exc) as info:
    prepare.prepare_dataset(layout, src, dst, progress=False, **kw)
  assert isinstance(info.value, DatasetError)
  assert needle in str(info.value), str(info.value)
  # nothing that looks like a dataset (or a temp folder) is left behind
  assert not os.path.exists(dst) or os.listdir(dst) == []
  return info.value


def test_missing_modality_file(tmp_path):
  src = _make(tmp_path, "fmb")
  os.remove(src / "train" / "Infrared" / "00002.png")
  err = _expect(tmp_path, "fmb", src, MissingFileError, "Infrared/00002.png")
  assert "missing thermal file" in str(err)
  assert isinstance(err, FileNotFoundError)


def test_missing_mfnet_label(tmp_path):
  src = _make(tmp_path, "mfnet")
  os.remove(src / "labels" / "00003D.png")
  _expect(tmp_path, "mfnet", src, MissingFileError, "labels/00003D.png")


def test_size_mismatch(tmp_path):
  src = _make(tmp_path, "vdt")
  path = src / "Test" / "T" / "00003.png"
  Image.open(path).resize((W + 2, H)).save(path)
  err = _expect(tmp_path, "vdt", src, SizeMismatchError, "T/00003.png")
  assert "differs" in str(err)


def test_wrong_channel_count_mfnet(tmp_path):
  src = _make(tmp_path, "mfnet")
  path = src / "images" / "00002N.png"
  Image.open(path).convert("RGB").save(path)
  err = _expect(tmp_path, "mfnet", src, ChannelError, "images/00002N.png")
  assert "expected 4 channels" in str(err)


def test_colour_thermal_strict_and_luma(tmp_path):
  src = _make(tmp_path, "fmb")
  path = src / "train" / "Infrared" / "00001.png"
  g = np.asarray(Image.open(path))
  Image.fromarray(np.stack([g, g // 2, 255 - g], -1)).save(path)
  _expect(tmp_path, "fmb", src, ChannelError, "Infrared/00001.png")
  prepare.prepare_dataset("fmb", src, tmp_path / "dst", grey_policy="luma", progress=False)
  assert prepare.is_prepared("fmb", tmp_path / "dst")


def test_label_out_of_range(tmp_path):
  src = _make(tmp_path, "mfnet")
  path = src / "labels" / "00005D.png"
  lab = np.asarray(Image.open(path)).copy()
  lab[0, 0], lab[0, 1], lab[1, 0] = 9, 200, 255  # 255 is fine, 9 and 200 are not
  Image.fromarray(lab).save(path)
  err = _expect(tmp_path, "mfnet", src, LabelRangeError, "labels/00005D.png")
  assert "9, 200" in str(err) and "0-8" in str(err)


def test_ignore_index_is_accepted(tmp_path):
  src = _make(tmp_path, "fmb")
  path = src / "test" / "Label" / "00005.png"
  lab = np.asarray(Image.open(path)).copy()
  lab[:4] = 255
  Image.fromarray(lab).save(path)
  prepare.prepare_dataset("fmb", src, tmp_path / "dst", progress=False)


def test_corrupt_png(tmp_path):
  src = _make(tmp_path, "vdt")
  path = src / "Train" / "V" / "00002.png"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  _expect(tmp_path, "vdt", src, CorruptImageError, "V/00002.png")


def test_not_an_image(tmp_path):
  src = _make(tmp_path, "mfnet")
  (src / "labels" / "00001D.png").write_bytes(b"not a png")
  _expect(tmp_path, "mfnet", src, CorruptImageError, "labels/00001D.png")


@pytest.mark.parametrize("content,needle", [
    ("00001D\n\n00002N\n", "line 2 is an empty entry"),
    ("00001D\n00002N\n00001D\n", "'00001D' is duplicated"),
    ("00001D\n00005D\n", "also in"),  # 00005D is in val
])
def test_bad_split_list(tmp_path, content, needle):
  src = _make(tmp_path, "mfnet")
  (src / "train.txt").write_text(content)
  err = _expect(tmp_path, "mfnet", src, SplitListError, needle)
  assert "train.txt" in str(err) or "val.txt" in str(err)


def test_trailing_blank_lines_are_fine(tmp_path):
  src = _make(tmp_path, "mfnet")
  with open(src / "train.txt", "a") as f:
    f.write("\n\n")
  prepare.prepare_dataset("mfnet", src, tmp_path / "dst", progress=False)


def test_duplicated_folder_entry(tmp_path):
  src = _make(tmp_path, "fmb")
  d = src / "train" / "Visible"
  Image.open(d / "00001.png").save(d / "00001.jpg")
  _expect(tmp_path, "fmb", src, SplitListError, "duplicated entry")


@pytest.mark.parametrize("layout,remove,where", [
    ("mfnet", "labels", "RTFNet"), ("fmb", "test", "SegMiF"), ("vdt", "Train/GT", "VDT-2048")])
def test_layout_error_explains_layout_and_source(tmp_path, layout, remove, where):
  src = _make(tmp_path, layout)
  import shutil
  shutil.rmtree(src / remove)
  err = _expect(tmp_path, layout, src, LayoutError, remove)
  assert "Expected layout" in str(err) and where in str(err)


def test_cli_bad_input_exits_non_zero(tmp_path, capsys):
  rc = prepare_cli.main(["--dataset", "fmb", "--manual_dir", str(tmp_path / "nowhere"),
                     "--data_dir", str(tmp_path / "dst"), "--noprogress"])
  assert rc != 0
  err = capsys.readouterr().err
  assert "nowhere" in err and "Visible" in err and "SegMiF" in err
  src = _make(tmp_path, "mfnet")
  (src / "labels" / "00001D.png").write_bytes(b"junk")
  rc = prepare_cli.main(["--dataset", "mfnet", "--manual_dir", str(src),
                     "--data_dir", str(tmp_path / "dst"), "--noprogress"])
  assert rc == 1 and "00001D.png" in capsys.readouterr().err


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
  """A failure after validation (here: injected in the writer) leaves no dataset behind."""
  src = _make(tmp_path, "mfnet")
  orig = builders._Builder._generate_examples
  def flaky(self, samples):
    for i, kv in enumerate(orig(self, samples)):
      if i == 2:
        raise OSError("disk full")
      yield kv
  monkeypatch.setattr(builders._Builder, "_generate_examples", flaky)
  dst = tmp_path / "dst"
  with pytest.raises(Exception, match="disk full"):
    prepare.prepare_dataset("mfnet", src, dst, progress=False)
  assert os.listdir(dst) == []
  assert not prepare.is_prepared("mfnet", dst)


def test_16_bit_image(tmp_path):
  src = _make(tmp_path, "vdt")
  path = src / "Test" / "D" / "00004.png"
  depth = np.asarray(Image.open(path)).astype(np.uint16) * 257
  Image.fromarray(depth).save(path)
  err = _expect(tmp_path, "vdt", src, ChannelError, "D/00004.png")
  assert "8-bit" in str(err)


def _png(path, arr: np.ndarray, bit_depth: int = 16) -> None:
  """A PNG written by hand (PIL writes no 16-bit RGB): arr (H, W, C) uint16, C in 1..4."""
  import struct
  import zlib
  h, w, c = arr.shape
  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  rows = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("layout,rel,channels", [
    ("vdt", "Test/V/00004.png", 3), ("mfnet", "images/00002N.png", 4)])
def test_16_bit_colour_png_is_refused(tmp_path, layout, rel, channels):
  """Issue 17, defect 6: PIL read 16-bit RGB(A) as 8-bit (1000 -> 3) and prepare took it."""
  src = _make(tmp_path, layout)
  arr = np.full((H, W, channels), 1000, np.uint16)
  _png(src / rel, arr)
  from PIL import Image as _I
  with _I.open(src / rel) as im:   # the silent reduction the check guards against
    assert im.mode in ("RGB", "RGBA") and np.asarray(im).max() == 3
  err = _expect(tmp_path, layout, src, ChannelError, rel)
  assert "16-bit PNG" in str(err) and "8-bit" in str(err)


def test_decompression_bomb_is_one_error(tmp_path):
  """A 20000 x 20000 header: PIL's DecompressionBombError escaped as a traceback."""
  src = _make(tmp_path, "fmb")
  rel = "train/Infrared/00002.png"
  _png(src / rel, np.zeros((1, 1, 1), np.uint16), bit_depth=8)
  data = bytearray((src / rel).read_bytes())   # patch the IHDR size (the CRC is not read first)
  import struct
  import zlib
  data[16:24] = struct.pack(">II", 20000, 20000)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
  (src / rel).write_bytes(bytes(data))
  err = _expect(tmp_path, "fmb", src, CorruptImageError, rel)
  assert "decompression bomb" in str(err) and "400000000 pixels" in str(err)


@pytest.mark.parametrize("content,needle", [
    (b"00001D\n\xff\xfe00002N\n", "not UTF-8 text (byte 0xff on line 2)"),
    (b"00001D\n../../../etc/passwd\n", "line 2: '../../../etc/passwd' is a path out of"),
    (b"/etc/passwd\n", "line 1: '/etc/passwd' is a path out of"),
    (b"images/../../x\n", "is a path out of"),
])
def test_bad_split_list_entries(tmp_path, content, needle):
  """Issue 17, defects 9/10: a non-UTF-8 list was a traceback; '../' and absolute entries
  were read from outside --manual_dir."""
  src = _make(tmp_path, "mfnet")
  (src / "train.txt").write_bytes(content)
  err = _expect(tmp_path, "mfnet", src, SplitListError, "train.txt")
  assert needle in str(err), str(err)


def test_symlink_loop_is_named(tmp_path):
  src = _make(tmp_path, "vdt")
  p = src / "Test" / "T" / "00003.png"
  os.remove(p)
  os.symlink(p, p)
  err = _expect(tmp_path, "vdt", src, CorruptImageError, "T/00003.png")
  assert "symbolic link" in str(err) and "does not exist" not in str(err)


def test_unwritable_data_dir_and_orphans(tmp_path, capsys):
  """Issue 17, defects 9/12: an unwritable --data_dir was a traceback; the temp folder of a
  killed prepare was never removed."""
  src = _make(tmp_path, "mfnet")
  (tmp_path / "file").write_text("x")
  rc = prepare_cli.main(["--dataset", "mfnet", "--manual_dir", str(src), "--data_dir",
                     str(tmp_path / "file" / "dst"), "--noprogress"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1 and "cannot write the mfnet dataset" in err[0], err
  import subprocess
  import sys
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  dst = tmp_path / "dst"
  (dst / f".mfnet-building-{dead}-abcd1234" / "data").mkdir(parents=True)
  (dst / ".mfnet-building-x1y2z3w4").mkdir()   # older versions' name (no pid)
  prepare.prepare_dataset("mfnet", src, dst, progress=False)
  assert sorted(os.listdir(dst)) == ["mfnet"]


def test_full_disk_gives_one_line_and_nothing_partial(tmp_path):
  """Issue 17, defect 9: disk full while writing the ArrayRecord files."""
  import subprocess
  import sys
  from _faults import on_tmpfs
  src = _make(tmp_path, "mfnet", num=24)
  mnt = tmp_path / "mnt"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "fusionsam_jax.data.prepare", "--dataset", "mfnet",
         "--manual_dir", str(src), "--data_dir", str(mnt / "dst"), "--noprogress"]
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  res = on_tmpfs(["sh", "-c", '"$@"; rc=$?; ls -A "$0/dst" >&2; exit $rc', str(mnt), *cmd],
                 mnt, size="128k", env=env, cwd=root, timeout=300)
  lines = [l for l in res.stderr.strip().splitlines() if l]
  assert res.returncode == 1, res.stderr[-3000:]
  assert len(lines) == 1 and "writing the mfnet dataset failed" in lines[0], res.stderr[-3000:]


def test_exif_orientation_is_applied(tmp_path):
  """Issue 37 item 5: an orientation-6 JPEG (stored sideways, shown upright) was used
  unrotated, misregistered with its thermal image."""
  from PIL import Image

  from fusionsam_jax.data.io import read_image
  upright = np.zeros((40, 30, 3), np.uint8)     # as a viewer shows it: 40 high, 30 wide
  upright[:10, :, 0] = 255                      # a red band at the top
  # Stored rotated by 90 degrees (as a camera writes it), with EXIF orientation 6 ("rotate
  # 90 CW to view").
  stored = np.rot90(upright, k=1)               # (30, 40, 3), the top band now on the left
  img = Image.fromarray(np.ascontiguousarray(stored))
  exif = Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "phone.jpg"
  img.save(path, exif=exif, quality=100)
  got = read_image(path)
  assert got.shape == (40, 30, 3)
  assert got[:10, :, 0].mean() > 200 and got[20:, :, 0].mean() < 50
