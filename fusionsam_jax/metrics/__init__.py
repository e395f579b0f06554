"""Evaluation metrics: semantic-segmentation IoU (``miou``) and saliency (``sod``).

The names below are loaded on first use (PEP 562), not when the package is imported: so
``python -m fusionsam_jax.metrics.miou`` runs the module once, as ``__main__``, without the
runpy warning about a module already imported by its package.
"""

import importlib

_EXPORTS = {
    "ConfusionMatrix": "fusionsam_jax.metrics.miou",
    "confusion_matrix": "fusionsam_jax.metrics.miou",
    "format_iou_table": "fusionsam_jax.metrics.miou",
    "format_paper_table": "fusionsam_jax.metrics.miou",
    "SODMetrics": "fusionsam_jax.metrics.sod",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
