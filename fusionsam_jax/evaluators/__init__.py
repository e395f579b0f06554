"""Evaluators: full-resolution segmentation / saliency evaluation of a params tree."""
