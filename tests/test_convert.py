"""The SAM converter CLI: variant detection, clean rejections, atomic output."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusionsam_jax.models.sam.sam import SAM_PRESETS
from fusionsam_jax.models.sam.checkpoint import (FORMAT, infer_config, load_sam_checkpoint,
                                          read_sam_meta, write_params_dir)
import sam_reference as ref


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("conv")
  sam = ref.build_torch_sam(SAM_PRESETS["tiny"], seed=3)
  path = tmp / "tiny.pth"
  ref.save_state_dict(sam, path)
  return path, sam


def _fails(res, *needles):
  assert res.returncode != 0
  lines = [l for l in res.stderr.strip().splitlines() if l]
  assert len(lines) == 1, res.stderr  # one-line error, no traceback
  for n in needles:
    assert n in lines[0], lines[0]


def _only(tmp_path, *names):
  assert sorted(os.listdir(tmp_path)) == sorted(names)


def test_converts_and_records_metadata(tiny_pth, tmp_path):
  pth, sam = tiny_pth
  res = ref.run_converter(pth, tmp_path / "out")
  assert res.returncode == 0, res.stderr
  meta = read_sam_meta(str(tmp_path / "out"))
  assert meta["variant"] == "tiny" and meta["source"] == "tiny.pth"
  import hashlib
  assert meta["sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
  cfg, params = load_sam_checkpoint(str(tmp_path / "out"))
  # A leaf copied as-is and one transposed, checked against the torch tensors.
  sd = sam.state_dict()
  np.testing.assert_array_equal(params["image_encoder"]["blocks_1"]["attn"]["rel_pos_h"],
                                sd["image_encoder.blocks.1.attn.rel_pos_h"].numpy())
  np.testing.assert_array_equal(params["mask_decoder"]["iou_prediction_head"]["layers_0"]["kernel"],
                                sd["mask_decoder.iou_prediction_head.layers.0.weight"].numpy().T)
  _only(tmp_path, "out")


def test_variant_detection_from_shapes():
  for name in ("vit_b", "vit_l", "vit_h"):
    cfg = SAM_PRESETS[name]
    # Shapes alone (no tensors): infer_config only reads .shape.
    import types
    fake = {}
    sam_abstract = _abstract_torch_shapes(cfg)
    for k, shape in sam_abstract.items():
      fake[k] = types.SimpleNamespace(shape=shape)
    assert infer_config(fake) == cfg, name


def _abstract_torch_shapes(cfg):
  with torch.device("meta"):
    sam = ref.build_torch_sam(cfg, randomize=False)
  return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


def test_model_type_mismatch(tiny_pth, tmp_path):
  pth, _ = tiny_pth
  _fails(ref.run_converter(pth, tmp_path / "out", "--model_type", "vit_h"), "vit_h", "tiny")
  _only(tmp_path)


def test_missing_file(tmp_path):
  _fails(ref.run_converter(tmp_path / "nope.pth", tmp_path / "out"), "nope.pth", "no such file")
  _only(tmp_path)


def test_truncated_file(tiny_pth, tmp_path):
  pth, _ = tiny_pth
  bad = tmp_path / "trunc.pth"
  bad.write_bytes(pth.read_bytes()[: os.path.getsize(pth) // 2])
  _fails(ref.run_converter(bad, tmp_path / "out"), "trunc.pth", "not a readable")
  _only(tmp_path, "trunc.pth")


def test_not_a_checkpoint(tmp_path):
  bad = tmp_path / "notes.pth"
  bad.write_text("hello, I am a text file\n")
  _fails(ref.run_converter(bad, tmp_path / "out"), "notes.pth", "not a readable")


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > PWNED",))


def test_pickle_needing_code_execution_is_refused(tmp_path):
  bad = tmp_path / "evil.pth"
  torch.save({"image_encoder.x": _Evil()}, bad)
  res = ref.run_converter(bad, tmp_path / "out")
  _fails(res, "evil.pth", "code execution")
  assert not os.path.exists(os.path.join(ref.REPO, "PWNED"))
  _only(tmp_path, "evil.pth")


def test_missing_and_unexpected_keys(tiny_pth, tmp_path):
  _, sam = tiny_pth
  sd = dict(sam.state_dict())
  del sd["mask_decoder.iou_token.weight"]
  sd["mask_decoder.extra.weight"] = torch.zeros(3)
  path = tmp_path / "keys.pth"
  torch.save(sd, path)
  _fails(ref.run_converter(path, tmp_path / "out"), "missing keys", "mask_decoder/iou_token/embedding",
         "unexpected keys", "mask_decoder.extra.weight")
  _only(tmp_path, "keys.pth")


def test_shape_mismatch(tiny_pth, tmp_path):
  _, sam = tiny_pth
  sd = dict(sam.state_dict())
  w = sd["mask_decoder.iou_prediction_head.layers.1.weight"]
  sd["mask_decoder.iou_prediction_head.layers.1.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)
  path = tmp_path / "shape.pth"
  torch.save(sd, path)
  _fails(ref.run_converter(path, tmp_path / "out"), "mask_decoder.iou_prediction_head.layers.1.weight",
         "expected", "found")
  _only(tmp_path, "shape.pth")


def test_existing_output_needs_overwrite(tiny_pth, tmp_path):
  pth, _ = tiny_pth
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  _fails(ref.run_converter(pth, out), "already exists", "--overwrite")
  assert (out / "keep.txt").read_text() == "user data"
  # --overwrite never replaces a folder this converter did not write (issue 17, defect 2)
  _fails(ref.run_converter(pth, out, "--overwrite"), "keep.txt", "only a checkpoint directory")
  assert sorted(os.listdir(out)) == ["keep.txt"]
  # ... a folder it wrote is replaced (written here with tiny params in that layout)
  os.remove(out / "keep.txt")   # an empty folder may be replaced too
  write_params_dir(str(out), {"w": np.zeros(2, np.float32)}, {"format": FORMAT}, overwrite=True)
  res = ref.run_converter(pth, out, "--overwrite")
  assert res.returncode == 0, res.stderr
  assert read_sam_meta(str(out))["variant"] == "tiny"
  _only(tmp_path, "out")


def _refused(pth, out, *needles):
  from fusionsam_jax.models.sam.checkpoint import CheckpointError, convert_file
  with pytest.raises(CheckpointError) as e:
    convert_file(str(pth), str(out), overwrite=True)
  for n in needles:
    assert n in str(e.value), str(e.value)


def test_overwrite_never_deletes_the_input_or_a_foreign_folder(tiny_pth, tmp_path):
  """Issue 17, defect 2: `--output DIR --overwrite` deleted whatever DIR held, the input
  .pth included, and exited 0."""
  pth, _ = tiny_pth
  box = tmp_path / "box"
  box.mkdir()
  (box / "notes.txt").write_text("mine")
  inp = box / "model.pth"
  inp.write_bytes(pth.read_bytes())
  _fails(ref.run_converter(inp, box, "--overwrite"), "holds the input", "model.pth")
  _refused(inp, tmp_path, "holds the input")
  _refused(inp, inp, "holds the input")
  assert sorted(os.listdir(box)) == ["model.pth", "notes.txt"]
  assert inp.read_bytes() == pth.read_bytes()
  # a plain file, a SAM 2 checkpoint folder, a folder with our meta file plus other files
  (tmp_path / "file").write_text("x")
  _refused(pth, tmp_path / "file", "not a directory")
  sam2 = tmp_path / "sam2"
  write_params_dir(str(sam2), {"w": np.zeros(2, np.float32)}, {"format": "fusionsam_jax.sam2/1"},
                   meta_file="sam2_meta.json")
  _refused(pth, sam2, "sam2_meta.json")
  mixed = tmp_path / "mixed"
  write_params_dir(str(mixed), {"w": np.zeros(2, np.float32)}, {"format": FORMAT})
  (mixed / "extra.bin").write_bytes(b"1")
  _refused(pth, mixed, "extra.bin")
  forged = tmp_path / "forged"
  forged.mkdir()
  (forged / "sam_meta.json").write_text('{"format": "other"}')
  _refused(pth, forged, "format 'other'")
  assert (forged / "sam_meta.json").exists() and (mixed / "extra.bin").exists()


def test_converted_modes_follow_umask_and_orphans_are_cleaned(tmp_path):
  """Issue 17, defect 12: converted checkpoints were mode 0700 (mkdtemp); temp folders of a
  killed conversion were never removed."""
  import stat
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  orphan = tmp_path / f".out.tmp-{dead}-abcd1234"
  (orphan / "params").mkdir(parents=True)
  (tmp_path / f".out.old-{dead}-abcd1234").mkdir()
  (tmp_path / ".out.tmp-k2j4h5g6").mkdir()   # the old naming, without a pid
  lookalike = tmp_path / ".out.tmp-5.tmp-k2j4h5g6"   # output "out.tmp-5"'s: kept
  lookalike.mkdir()
  live = tmp_path / f".out.tmp-{os.getpid()}-live1234"   # a running writer's: kept
  live.mkdir()
  other = tmp_path / f".other.tmp-{dead}-abcd1234"        # another output's: kept
  other.mkdir()
  old = os.umask(0o022)
  try:
    write_params_dir(str(tmp_path / "out"), {"w": np.zeros(2, np.float32)}, {"format": FORMAT})
  finally:
    os.umask(old)
  assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name, other.name, lookalike.name])
  for d, dirs, files in os.walk(tmp_path / "out"):
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d
    for f in files:
      assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o644, f
  assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755


@pytest.mark.parametrize("value,needles", [
    (lambda: {"a": torch.zeros(0, 3)}, ["'a'", "empty"]),
    (lambda: {"a": torch.zeros(3, 3).to_sparse()}, ["'a'", "sparse", "dense"]),
    (lambda: {3: torch.zeros(2)}, ["key 3", "expected a string"]),
    (lambda: {"a": torch.arange(3)}, ["'a'", "torch.int64", "floating-point"]),
    (lambda: {"a": torch.ones(3, dtype=torch.bool)}, ["'a'", "torch.bool"]),
    (lambda: {"a": torch.ones(3, dtype=torch.complex64)}, ["'a'", "torch.complex64"]),
    (lambda: {"ok": torch.ones(2), "a": torch.tensor([1.0, float("nan")])},
     ["'a'", "1 non-finite", "NaN"]),
    (lambda: {"a": torch.tensor([float("inf"), -float("inf"), 0.0])}, ["'a'", "2 non-finite"]),
    (lambda: {"a": [1, 2]}, ["'a'", "list", "expected a tensor"]),
])
def test_bad_tensors_are_refused_by_name(value, needles, tmp_path):
  """Issue 17, defects 9/10: these were cast to float32 silently, or crashed with a traceback."""
  from fusionsam_jax.models.sam.checkpoint import CheckpointError, load_torch_state_dict
  path = tmp_path / "bad.pth"
  torch.save(value(), path)
  with pytest.raises(CheckpointError) as e:
    load_torch_state_dict(str(path))
  assert str(e.value).startswith(f"{path}:") and "\n" not in str(e.value)
  for n in needles:
    assert n in str(e.value), str(e.value)


def test_wrong_rank_tensor_is_refused(tiny_pth, tmp_path):
  """A 1-D patch embedding: an IndexError traceback before."""
  pth, sam = tiny_pth
  sd = {k: v.numpy() for k, v in sam.state_dict().items()}
  sd["image_encoder.patch_embed.proj.weight"] = np.ones(8, np.float32)
  from fusionsam_jax.models.sam.checkpoint import CheckpointError
  with pytest.raises(CheckpointError, match="patch_embed.proj.weight.*expected a 4-D"):
    infer_config(sd, "x.pth")


def test_unreadable_files_get_the_right_reason(tmp_path):
  """Random bytes are not 'a pickle needing code execution'; a symlink loop is not 'no such
  file' (issue 17, defect 11)."""
  from fusionsam_jax.models.sam.checkpoint import CheckpointError, load_torch_state_dict
  rand = tmp_path / "rand.pth"
  rand.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(CheckpointError) as e:
    load_torch_state_dict(str(rand))
  assert "not a readable PyTorch checkpoint" in str(e.value)
  assert "code execution" not in str(e.value)
  loop = tmp_path / "loop.pth"
  os.symlink(loop, loop)
  with pytest.raises(CheckpointError, match="symbolic link.*levels of symbolic links"):
    load_torch_state_dict(str(loop))


def test_full_or_read_only_disk_gives_one_line_and_nothing_partial(tiny_pth, tmp_path):
  """Issue 17, defect 9: a 708-line traceback on a full disk."""
  from _faults import on_tmpfs
  pth, _ = tiny_pth
  mnt = tmp_path / "mnt"
  cmd = [sys.executable, os.path.join(ref.REPO, "tools", "convert_sam_weights.py"),
         "--checkpoint", str(pth), "--output", str(mnt / "out")]
  env = dict(os.environ, PYTHONPATH=ref.REPO, JAX_PLATFORMS="cpu")
  # tmpfs writes vanish with the namespace: list the folder from inside it
  for ro, needle in ((False, "No space left"), (True, "Read-only")):
    res = on_tmpfs(["sh", "-c", '"$@"; rc=$?; ls -A "$0" >&2; exit $rc', str(mnt), *cmd],
                   mnt, size="512k", read_only=ro, env=env, cwd=ref.REPO)
    lines = [l for l in res.stderr.strip().splitlines() if l]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1, res.stderr   # the error; `ls` printed nothing: no partial output
    assert "cannot write" in lines[0] and needle in lines[0], lines[0]
