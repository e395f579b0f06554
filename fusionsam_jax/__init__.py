"""fusionsam-jax: FusionSAM (KDD '25) in JAX/Flax on a Flax port of Segment Anything."""

__version__ = "0.1.0"
