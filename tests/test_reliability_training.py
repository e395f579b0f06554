"""Faults and bad inputs of a training run that need no trained workdir: the workdir lock,
orphans of killed runs, usage errors, a full disk while the embedding cache is built.
(The cases on a trained run, corrupt checkpoints, a refused config change and
kill-and-resume with the cache, are in test_cli_end_to_end.py.) docs/reliability.md lists
them all."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _cli_helpers import DEMO_TINY, ROOT, env, run_module, tiny_config


def _one_line_error(r):
  err = r.stderr.strip()
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


# -- the workdir lock --------------------------------------------------------------------------


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
  from fusionsam_jax.locking import DirLock, DirLockedError
  with DirLock(tmp_path, what="workdir"):
    with pytest.raises(DirLockedError, match=rf"in use by pid {os.getpid()} on "):
      DirLock(tmp_path).acquire()
  # released cleanly: the next holder takes it without a note
  said = []
  with DirLock(tmp_path, say=said.append) as lk:
    assert lk.previous is None and said == []


def test_stale_lock_of_a_killed_process_is_taken_over_and_said(tmp_path):
  from fusionsam_jax.locking import DirLock
  code = ("import sys, time; from fusionsam_jax.locking import DirLock; "
          "DirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
  p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env(), cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
  try:
    assert p.stdout.readline().strip() == "held"
    from fusionsam_jax.locking import DirLockedError
    with pytest.raises(DirLockedError, match=f"pid {p.pid}"):
      DirLock(tmp_path).acquire()
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  said = []
  with DirLock(tmp_path, say=said.append) as lk:
    assert lk.previous["pid"] == p.pid
  assert len(said) == 1 and f"pid {p.pid}" in said[0] and "took over" in said[0]


def test_second_train_on_a_locked_workdir_exits_with_one_line(tmp_path):
  """A train run on a workdir another run holds: exit 1, one line naming the holder's pid,
  nothing written (the holder here is this test process)."""
  from fusionsam_jax.locking import DirLock
  work = tmp_path / "run"
  work.mkdir()
  with DirLock(work):
    r = run_module("fusionsam_jax.train", f"--config={DEMO_TINY}", f"--workdir={work}",
                   f"--config.data_dir={tmp_path / 'data'}", "--noprogress", timeout=300)
  assert r.returncode == 1
  line = _one_line_error(r)
  assert f"pid {os.getpid()}" in line and str(work) in line
  assert sorted(os.listdir(work)) == [".lock"]
  assert not (tmp_path / "data").exists()


def test_orphans_of_killed_runs_are_removed_and_said(tmp_path):
  from fusionsam_jax import workdir as W
  work = tmp_path
  keep = ["config.json", "checkpoints/fusion/4/x", "checkpoints/fusion_corrupt/4-1/x",
          "embedding_cache/train-abc/meta.json", "eval_test_best.json"]
  orphans = ["config.json.tmp-123", ".tmp-ab12.json", "embedding_cache/.train-x1y2/emb.npy",
             "embedding_cache/.val-zz/batch_00000.npz",
             "checkpoints/fusion/8.orbax-checkpoint-tmp-1700000000/x",
             "checkpoints/tokenizer/STAGE_DONE.json.tmp-99"]
  for f in keep + orphans:
    (work / f).parent.mkdir(parents=True, exist_ok=True)
    (work / f).write_text("x")
  said = []
  with W.lock(str(work), say=said.append):
    removed = W.remove_orphans(str(work), say=said.append)
  assert len(removed) == len(orphans)
  for f in keep:
    assert (work / f).exists(), f
  for f in orphans:
    assert not (work / f.split("/x")[0]).exists() and not (work / f).exists(), f
  assert len(said) == 1 and "removed 6 temporary file(s)" in said[0]


# -- usage errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("args,expect", [
    ([f"--config={ROOT}/configs/demo.py:bogus"], "unknown config variant(s) ['bogus']"),
    ([f"--config={ROOT}/configs/nope.py"], "No such file or directory"),
    ([f"--config={DEMO_TINY}", "--config.train.bogus=1"], "--config.train.bogus: unknown "
     "config key 'bogus'"),
    ([f"--config={DEMO_TINY}", "WORKDIR_IS_A_FILE"], "is a file, not a folder"),
    ([f"--config={DEMO_TINY}", "--config.train.batch_size=abc"],
     "--config.train.batch_size=abc: invalid literal for int()"),
    ([f"--config={DEMO_TINY}", "--bogus"], "Unknown command line flag 'bogus'"),
    ([f"--config={DEMO_TINY}", "stray"], "unexpected arguments: stray"),
])
def test_train_usage_errors_are_one_line_exit_2(tmp_path, args, expect):
  f = tmp_path / "afile"
  f.write_text("x")
  work = f if "WORKDIR_IS_A_FILE" in args else tmp_path / "w"
  args = [a for a in args if a != "WORKDIR_IS_A_FILE"]
  r = run_module("fusionsam_jax.train", *args, f"--workdir={work}", "--noprogress",
                 timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert expect in _one_line_error(r)


def test_unwritable_workdir_is_a_usage_error(tmp_path, monkeypatch, capsys):
  """A read-only workdir (simulated: EROFS at the first write; root ignores file modes) ->
  exit 2, one line; a real read-only folder when not root."""
  from fusionsam_jax.cli import train
  from fusionsam_jax import workdir as W
  cfg = tiny_config(tmp_path / "data")
  ro = tmp_path / "ro"
  ro.mkdir()
  if os.geteuid() != 0:
    ro.chmod(0o555)
  else:
    real_open = open

    def fake_open(path, *a, **k):
      if str(path).startswith(str(ro)) and a and "w" in a[0]:
        raise OSError(errno.EROFS, "Read-only file system", str(path))
      return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
  try:
    assert train.run(cfg, str(ro), progress=False) == 2
  finally:
    ro.chmod(0o755)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is not writable" in err and str(ro) in err
  assert W.open_workdir(str(tmp_path / "new" / "sub")) == str(tmp_path / "new" / "sub")


def test_disk_full_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
  from fusionsam_jax import experiment
  from fusionsam_jax.cli import train

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))
  monkeypatch.setattr(experiment, "train", full)
  assert train.run(tiny_config(tmp_path), str(tmp_path), progress=False) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no space left on the device" in err and "x.npy" in err


# -- a full disk while the embedding cache is built ----------------------------------------------


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory):
  from fusionsam_jax import data
  from fusionsam_jax import training as T
  from fusionsam_jax.models import factory
  cfg = tiny_config(tmp_path_factory.mktemp("cache_data"))
  els = data.generate_elements("mfnet", 6, seed=3, height=96, width=128)
  model = factory.build_model(cfg)
  return (cfg, model, factory.init_params(cfg, model), data.InMemorySource(els[:4]),
          data.InMemorySource(els[4:]), T.make_mesh())


def _build(cache_setup, workdir):
  from fusionsam_jax.stages import embedding_cache as EC
  cfg, model, params, train_src, val_src, mesh = cache_setup
  return EC.build_for_sources(cfg, str(workdir), model, params, mesh, train_src, val_src,
                              progress=False, say=lambda m: None)


def test_cache_build_disk_full_raises_and_leaves_nothing(cache_setup, tmp_path, monkeypatch):
  """ENOSPC at a write of the train cache (simulated at the write call) and too little free
  space up front: both an OSError(ENOSPC), the temporary folder removed."""
  from fusionsam_jax.stages import embedding_cache as EC
  real = EC.NpyWriter.append
  calls = []

  def append(self, block):
    calls.append(1)
    if len(calls) > 3:
      raise OSError(errno.ENOSPC, "No space left on device", self.path)
    real(self, block)
  monkeypatch.setattr(EC.NpyWriter, "append", append)
  with pytest.raises(OSError) as e:
    _build(cache_setup, tmp_path / "a")
  assert e.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path / "a" / "embedding_cache") == []
  monkeypatch.setattr(EC.NpyWriter, "append", real)

  monkeypatch.setattr(EC.shutil, "disk_usage",
                      lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
  with pytest.raises(OSError, match=r"embedding cache needs .* MiB, 0.0 MiB are free") as e:
    _build(cache_setup, tmp_path / "b")
  assert e.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path / "b" / "embedding_cache") == []


def test_cache_writer_matches_numpy(tmp_path):
  """NpyWriter's files are what np.save writes for the same array (read back by np.load)."""
  from fusionsam_jax.stages.embedding_cache import NpyWriter
  a = np.random.default_rng(0).standard_normal((7, 3, 5)).astype(np.float16)
  w = NpyWriter(str(tmp_path / "a.npy"), np.float16, a.shape)
  w.append(a[:4])
  w.append(a[4:])
  w.close()
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy", mmap_mode="r"), a)
  w = NpyWriter(str(tmp_path / "b.npy"), np.float16, a.shape)
  w.append(a[:2])
  with pytest.raises(ValueError, match="2 of 7 rows"):
    w.close()


_TMPFS_SCRIPT = r"""
import errno, os, sys
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
import test_reliability_training as t
from _cli_helpers import tiny_config
from fusionsam_jax import data
from fusionsam_jax import training as T
from fusionsam_jax.models import factory
from fusionsam_jax.stages import embedding_cache as EC
EC.check_free_space = lambda *a: None     # let the writes themselves meet the full disk
cfg = tiny_config(sys.argv[1] + "/data")
cfg.train.embedding_cache.num_views = 4
els = data.generate_elements("mfnet", 6, seed=3, height=96, width=128)
model = factory.build_model(cfg)
setup = (cfg, model, factory.init_params(cfg, model), data.InMemorySource(els[:4]),
         data.InMemorySource(els[4:]), T.make_mesh())
try:
  t._build(setup, sys.argv[1])
except OSError as e:
  print("ENOSPC" if e.errno == errno.ENOSPC else f"OSError {e}", os.listdir(
      os.path.join(sys.argv[1], "embedding_cache")))
  sys.exit(0)
print("no error")
"""


def test_cache_build_on_a_full_tmpfs_is_an_error_not_sigbus(tmp_path):
  """The cache built on a real 1 MiB tmpfs (mounted in a user + mount namespace): the full
  disk is an OSError(ENOSPC) and the temporary folder is gone (memory-mapped writes died
  with SIGBUS)."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                          f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (unshare -r -m + mount failed: "
                f"{probe.stderr.decode().strip()[:200]}); the simulated ENOSPC test covers it")
  script = tmp_path / "s.py"
  script.write_text(_TMPFS_SCRIPT)
  r = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                      f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} "
                      f"{script} {mnt} {ROOT}"], env=env(), cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
  assert r.stdout.strip() == "ENOSPC []", r.stdout + r.stderr[-3000:]


def test_generated_data_orphans_removed_and_concurrent_makers_wait(tmp_path):
  """The generated data folder of a config: temporaries of a killed maker (generate's
  `.raw-generating-*`, prepare's `.mfnet-building-*`) are removed by the next one (said);
  a maker waits for a live one instead of writing the same folder."""
  import threading
  from fusionsam_jax.data import spec as D
  from fusionsam_jax.locking import DirLock
  cfg = tiny_config(tmp_path / "data")
  cfg.generate.num = 8
  d = D.data_spec(cfg).data_dir
  os.makedirs(os.path.join(d, ".mfnet-building-abc12", "data"))
  os.makedirs(os.path.join(d, ".raw-generating-xyz"))
  said = []
  holder = DirLock(d).acquire()
  t = threading.Thread(target=lambda: D.ensure_data(cfg, say=said.append))
  t.start()
  deadline = time.time() + 30
  while not said and time.time() < deadline:
    time.sleep(0.05)
  assert said and said[0].startswith("waiting for pid") and t.is_alive()
  holder.release()
  t.join(120)
  assert not t.is_alive()
  assert sorted(n for n in os.listdir(d) if n.startswith(".")) == [".lock"]
  assert any("removed 2 temporary file(s)" in m for m in said), said
  assert D.ensure_data(cfg, say=said.append).data_dir == d


@pytest.mark.parametrize("key,value,needle", [
    ("eval.val_split", "test", "not a test split"),
    ("eval.val_split", "test_night", "not a test split"),
    ("train.embedding_cache.dtype", "int8", "float32, float16, bfloat16"),
    ("train.batch_size", 0, "a positive integer"),
    ("train.crop_size", (0, 0), "both positive"),
    ("train.flip_prob", 2.0, "[0, 1]"),
    ("train.scale_range", (2.0, 0.5), "low <= high"),
    ("train.stages.tokenizer.num_steps", -1, "0 or more"),
    ("train.stages.segmentation.num_steps", 0, "at least 1"),
    ("model.num_classes", 3, "has 9 classes"),
])
def test_bad_config_values_are_refused_before_anything_is_written(tmp_path, capsys, key, value,
                                                                  needle):
  """Issue 37 items 3, 6, 8, 12: a value outside its meaning trained silently (int8 cache,
  selection on test) or failed late after storing config.json, blocking the corrected
  command. Now: exit 2 with one line naming the key, and the workdir holds no config."""
  from fusionsam_jax.cli import train
  cfg = tiny_config(tmp_path)
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  work = tmp_path / "w"
  assert train.run(cfg, str(work), progress=False) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"--config.{key}=" in err and needle in err, err
  assert not (work / "config.json").exists() and not (work / "sam_weights.json").exists()
