"""Shared bits of the command-line tools (no flag definitions here)."""

from __future__ import annotations

import logging

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NONFINITE, EXIT_CONFIG = 0, 1, 2, 3, 4


def quiet_logs() -> None:
  """INFO logs of absl / orbax / the training loop are noise on the console: warnings only
  (metrics go to metrics.jsonl and TensorBoard)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
