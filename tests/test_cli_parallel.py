"""The segmentation-stage step of the real model on 8 CPU devices = on 1 device."""

import os
import subprocess
import sys

import pytest

import numpy as np

from _cli_helpers import ROOT, env


@pytest.mark.extended  # the mechanism: tests/test_training_parallel.py (8 devices, toy)
def test_segmentation_step_8_devices_matches_1(tmp_path):
  out = tmp_path / "par.npz"
  script = os.path.join(ROOT, "tests", "_cli_parallel_check.py")
  r = subprocess.run([sys.executable, script, str(out)], cwd=ROOT, capture_output=True,
                     text=True, timeout=600,
                     env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert r.returncode == 0, r.stderr[-4000:]
  z = dict(np.load(out))
  assert int(z["n_devices"]) == 8 and int(z["shards_8"]) == 8 and int(z["shards_1"]) == 1
  for s in (0,):
    np.testing.assert_allclose(z[f"loss_{s}_8"], z[f"loss_{s}_1"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(z["param_8"], z["param_1"], rtol=1e-3, atol=1e-5)
