"""`segment_anything`'s top-level names on the Flax port (re-exports only).

  from fusionsam_jax.sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

  sam = sam_model_registry["vit_h"](checkpoint="sam_vit_h_4b8939.pth")
  predictor = SamPredictor(sam)
"""

from fusionsam_jax.models.sam.amg import SamAutomaticMaskGenerator
from fusionsam_jax.models.sam.build import (build_sam, build_sam_vit_b, build_sam_vit_h,
                                            build_sam_vit_l, sam_model_registry)
from fusionsam_jax.models.sam.predictor import SamPredictor
from fusionsam_jax.models.sam.transforms import ResizeLongestSide

__all__ = ["build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b",
           "sam_model_registry", "SamPredictor", "SamAutomaticMaskGenerator",
           "ResizeLongestSide"]
