"""Moved to `fusionsam_jax.models.sam.predictor`; kept so old imports keep working."""

from fusionsam_jax.models.sam.predictor import SamPredictor  # noqa: F401
