"""Shared bits of the command-line tools (no flag definitions here)."""

from __future__ import annotations

import logging
import os

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NONFINITE, EXIT_CONFIG = 0, 1, 2, 3, 4


def quiet_logs() -> None:
  """INFO logs of absl / orbax / the training loop are noise on the console: warnings only
  (metrics go to metrics.jsonl and TensorBoard)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


#: Default location of JAX's persistent compilation cache for the CLIs.
DEFAULT_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
    "fusionsam_jax", "jax_compilation_cache")


def enable_compilation_cache(path: str | None) -> None:
  """JAX's persistent compilation cache at `path` (None / "": off), so that a second run of
  a config loads its compiled steps instead of compiling them again. ``JAX_COMPILATION_CACHE_DIR``
  in the environment wins."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not path or str(path).lower() == "none":
    return
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
