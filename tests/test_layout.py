"""The package's import graph (`tools/check_layout.py`): no module or package cycles, no
module importing a layer above its own, function-level imports only for heavy optional
dependencies (and in the command layer, which imports the library after parsing flags)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_graph_has_no_cycles_or_upward_imports():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_layout.py")],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr


def test_checker_finds_a_planted_cycle_and_upward_import(tmp_path):
  """The checker itself: a copy of the package with data importing the CLI layer fails."""
  import shutil
  shutil.copytree(os.path.join(ROOT, "fusionsam_jax"), tmp_path / "fusionsam_jax")
  shutil.copytree(os.path.join(ROOT, "tools"), tmp_path / "tools")
  with open(tmp_path / "fusionsam_jax" / "data" / "paths.py", "a") as f:
    f.write("\nfrom fusionsam_jax.cli import driver  # planted\n")
  r = subprocess.run([sys.executable, str(tmp_path / "tools" / "check_layout.py")],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert "imports upward fusionsam_jax.cli" in r.stdout
