"""Model-agnostic training infrastructure: mesh, state, checkpoints, the stage loop, logging.

See docs/training.md for how a stage is wired (`fusionsam_jax.stages` builds the steps).
"""

from fusionsam_jax.training.checkpointing import (
  CheckpointRestoreError,
  Restored,
  StageCheckpointer,
)
from fusionsam_jax.training.guards import (
  ConfigMismatchError,
  NonFiniteLossError,
  check_finite,
  check_workdir_config,
  config_fingerprint,
)
from fusionsam_jax.training.logging import MetricWriter, read_metrics_jsonl
from fusionsam_jax.training.loop import DevicePrefetch, StageResult, run_stage
from fusionsam_jax.training.mesh import (
  DATA_AXIS,
  check_global_batch,
  data_sharding,
  make_mesh,
  maybe_initialize_distributed,
  replicated,
  shard_batch,
)
from fusionsam_jax.training.state import TrainState, count_params, learning_rate_at

__all__ = [
  "CheckpointRestoreError", "Restored", "StageCheckpointer",
  "ConfigMismatchError", "NonFiniteLossError", "check_finite", "check_workdir_config",
  "config_fingerprint", "MetricWriter", "read_metrics_jsonl", "DevicePrefetch", "StageResult",
  "run_stage", "DATA_AXIS", "check_global_batch", "data_sharding", "make_mesh",
  "maybe_initialize_distributed", "replicated", "shard_batch", "TrainState", "count_params",
  "learning_rate_at",
]
