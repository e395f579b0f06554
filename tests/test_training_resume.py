"""A run killed with SIGKILL and restarted ends at the same parameters (bitwise on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from fusionsam_jax.training.logging import read_metrics_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--steps_a", "8", "--steps_b", "12", "--save_every", "4"]


def _cmd(workdir, *extra):
  return [sys.executable, os.path.join(os.path.dirname(__file__), "_toy.py"), "--workdir", str(workdir),
          *ARGS, *extra]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return env


def _finalized_steps(d):
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
  # The reference and the run to be killed start together (they share the 2 cores).
  ref = subprocess.Popen(_cmd(ref_dir), env=_env(), cwd=ROOT, stderr=subprocess.PIPE)
  victim = subprocess.Popen(_cmd(run_dir, "--step_delay", "0.15"), env=_env(), cwd=ROOT,
                            stderr=subprocess.PIPE)
  ckpt_b = run_dir / "checkpoints" / "b"
  deadline = time.time() + 240
  try:
    while not _finalized_steps(ckpt_b):
      assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
      assert time.time() < deadline, "no checkpoint of stage b appeared"
      time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
  finally:
    victim.wait()
  assert victim.returncode == -signal.SIGKILL
  killed_at = _finalized_steps(ckpt_b)
  assert killed_at and max(killed_at) < 12, killed_at
  assert not (ckpt_b / "STAGE_DONE.json").exists()
  assert (run_dir / "checkpoints" / "a" / "STAGE_DONE.json").exists()

  # Restart: stage a is skipped, stage b resumes from its latest checkpoint.
  subprocess.run(_cmd(run_dir), env=_env(), cwd=ROOT, check=True, timeout=240)
  assert ref.wait(timeout=240) == 0, ref.stderr.read().decode()[-3000:]

  a = np.load(ref_dir / "final_params.npz")
  b = np.load(run_dir / "final_params.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) == 4
  for k in a.files:
    assert np.array_equal(a[k], b[k]), k

  rows = read_metrics_jsonl(run_dir / "metrics.jsonl")
  resumed = [r for r in rows if r["split"] == "b/event" and "resumed_from_step" in r]
  assert resumed and resumed[-1]["resumed_from_step"] in killed_at
  # stage a was skipped, not resumed
  assert not [r for r in rows if r["split"] == "a/event" and "resumed_from_step" in r]
  done = json.loads((ckpt_b / "STAGE_DONE.json").read_text())
  assert done["step"] == 12
