"""Shared helpers for the benchmarks: environment record and atomic JSON output."""

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile


def environment():
  env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "python": platform.python_version(), "command": " ".join([sys.executable] + sys.argv),
         "host": platform.node()}
  for mod in ("jax", "jaxlib", "flax", "torch", "numpy"):
    try:
      env[mod] = __import__(mod).__version__
    except Exception:  # not installed
      pass
  try:
    import jax
    env["jax_devices"] = [str(d.device_kind) for d in jax.devices()]
  except Exception:
    pass
  try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except Exception:
    pass
  return env


def write_json(path, obj):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
