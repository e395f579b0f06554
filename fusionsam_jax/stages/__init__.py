"""FusionSAM's training stages, in order: tokenizer -> fusion -> segmentation.

Each module builds a `common.Stage` from a `common.Context`; `experiment.train` runs them,
`benchmarks/train_step.py` times their steps.
"""

from fusionsam_jax.stages.common import Context, Stage, drop, merge, select  # noqa: F401

STAGES = ("tokenizer", "fusion", "segmentation")
