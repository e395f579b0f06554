"""Data parallelism: 8 CPU devices give the same step as 1 device; batch placement errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fusionsam_jax import training as T
import _toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eight_devices_match_one_device(tmp_path):
  out = tmp_path / "eq8.npz"
  # Keeps this process's XLA_FLAGS (conftest's compile options): the frozen encoder is
  # compared bitwise with an init computed here.
  flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                 "--xla_force_host_platform_device_count=8"]))
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "_toy.py"), "--workdir",
                  str(tmp_path), "--equivalence_out", str(out)],
                 check=True, env=env, cwd=ROOT, timeout=300)
  eight = dict(np.load(out))
  one = _toy.equivalence_run(1)
  assert int(eight["n_devices"]) == 8 and int(eight["batch_shards"]) == 8
  assert int(one["n_devices"]) == 1
  keys = sorted(k for k in one if k.startswith(("loss_", "param")))
  assert any(k.startswith("param['head']") for k in keys)
  for k in keys:
    np.testing.assert_allclose(eight[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # the frozen encoder is untouched in both
  init = dict(_toy.ToyModel().init(jax.random.PRNGKey(0), np.zeros((1, 8)))["params"])
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(eight[f"param['encoder']['{k}']"], init["encoder"][k])


def test_tokenizer_val_pass_counts_the_whole_split_in_every_process(tmp_path):
  """The val pass after the tokenizer stage splits each batch over the mesh and sums the
  code counts and errors over its devices: 2 processes (CPU collectives over gloo), each
  loading half of val, report in each process what 1 device reports for the whole split.
  One process alone on its half differs (what each host reported before the pass ran on
  the mesh)."""
  import json
  import socket
  import _codebook_eval_check as check
  data = tmp_path / "data"
  s = check.setup(str(data))                  # also generates the set the processes read
  one = check.val_pass(s, T.make_mesh(jax.devices()[:1]))
  assert set(one) == {f"{m}/val_{k}" for m in ("rgb", "thermal")
                      for k in ("perplexity", "dead_codes", "rec")}
  assert one["rgb/val_perplexity"] > 2 and one["thermal/val_perplexity"] > 2  # not one code
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  path = os.pathsep.join([ROOT, os.path.dirname(__file__)])
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "_codebook_eval_check.py"),
       str(data), str(tmp_path / f"p{i}.json")], cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  try:
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
  finally:
    for p in procs:
      p.kill()                                   # no-op for a process that has exited
  local = []
  for i in range(2):
    r = json.load(open(tmp_path / f"p{i}.json"))
    assert r["n_processes"] == 2 and r["n_devices"] == 2 and r["val_images"] > 8
    for k in one:
      assert r["global"][k] == pytest.approx(one[k], rel=1e-5), (i, k)
    local.append(r["local"])
  assert any(loc[k] != pytest.approx(one[k], rel=1e-3) for loc in local for k in one)


def test_shard_batch_errors_and_placement():
  mesh = T.make_mesh(jax.devices()[:1])
  b = T.shard_batch({"x": np.zeros((4, 3), np.float32), "y": np.zeros((4,), np.int32)}, mesh)
  assert b["x"].shape == (4, 3) and b["x"].sharding.spec == T.data_sharding(mesh).spec
  with pytest.raises(ValueError, match="disagree on the batch dimension"):
    T.shard_batch({"x": np.zeros((4, 3)), "y": np.zeros((5,))}, mesh)
  with pytest.raises(ValueError, match="leading batch dimension"):
    T.shard_batch({"x": np.zeros(())}, mesh)
  T.check_global_batch(4, mesh)


def test_check_global_batch_message():
  class FakeMesh:
    shape = {"data": 8}
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    T.check_global_batch(12, FakeMesh())


def test_maybe_initialize_distributed_is_noop_without_env(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a single-task Slurm job is not multi-process
  assert T.maybe_initialize_distributed() is False
