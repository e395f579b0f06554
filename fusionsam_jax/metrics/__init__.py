"""Evaluation metrics: semantic-segmentation IoU (``miou``) and saliency (``sod``)."""

from fusionsam_jax.metrics.miou import ConfusionMatrix, confusion_matrix, format_iou_table
from fusionsam_jax.metrics.sod import SODMetrics

__all__ = ["ConfusionMatrix", "confusion_matrix", "format_iou_table", "SODMetrics"]
