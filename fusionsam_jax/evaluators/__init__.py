"""Evaluators: full-resolution segmentation / saliency evaluation of a params tree
(``segmentation``), the visual report (``report``), SAM zero-shot, Fig. 7a (``sam_zero_shot``)."""
