"""Evaluators of baselines against FusionSAM (Fig. 7a: `sam_zero_shot`)."""
