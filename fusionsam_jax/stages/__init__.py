"""FusionSAM's training stages, in order: tokenizer -> fusion -> segmentation.

Each module builds a `common.Stage` from a `common.Context` with ``make(ctx)``;
`registry.REGISTRY` declares them (name, make, RNG offset) in training order;
`experiment.train` runs them, `benchmarks/train_step.py` times their steps.
"""

from fusionsam_jax.stages.common import Context, Stage, StageSpec, drop, merge, select  # noqa: F401
from fusionsam_jax.stages.registry import NAMES as STAGES  # noqa: F401
