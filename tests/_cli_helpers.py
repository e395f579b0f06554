"""Helpers for tests/test_cli_*.py (not collected: no test_ prefix)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TINY = os.path.join(ROOT, "configs", "demo.py") + ":tiny"
NUM_SCENES = 16   # generated scenes: 8 train / 4 val / 4 test


def env(**extra) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  e.update(extra)
  return e


def run_module(module: str, *args: str, timeout: int = 600, **env_extra):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(**env_extra),
                        capture_output=True, text=True, timeout=timeout)


def tiny_overrides(data_dir) -> list[str]:
  return [f"--config.data_dir={data_dir}", f"--config.generate.num={NUM_SCENES}",
          "--noprogress"]


def tiny_config(data_dir, arg: str = "tiny"):
  """configs/demo.py:<arg> with the tests' data dir and scene count (unlocked ConfigDict)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs",
                                                                             "demo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data_dir = str(data_dir)
  c.generate.num = NUM_SCENES
  return c
