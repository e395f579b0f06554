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


def one_line(e: BaseException) -> str:
  """An exception as one line: its innermost non-empty message line (library messages are one
  line already; ml_collections / absl wrap theirs in several)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.run(..., flags_parser=parse_flags_or_exit)``) with every
  failure as one line on stderr and exit status 2 (usage): a bad value, an unknown flag, a
  config file that does not load, an unknown config variant or ``--config.KEY``."""
  import sys
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- anything raised while parsing is a usage error
    msg = one_line(e)
    if isinstance(e, (AttributeError, KeyError)):
      key = str(e).strip("'\" ")
      given = [a.split("=")[0] for a in argv[1:]
               if a.startswith("--config.") and key in a.split("=")[0].split(".")]
      if given:
        msg = (f"{', '.join(given)}: unknown config key {key!r} (see the config file for "
               "the keys it has)")
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
