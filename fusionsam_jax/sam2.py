"""`sam2`'s image-path names on the Flax port (re-exports only): those of `sam2.build_sam`,
`sam2.sam2_image_predictor` and `sam2.automatic_mask_generator`.

  from fusionsam_jax.sam2 import SAM2AutomaticMaskGenerator, SAM2ImagePredictor, build_sam2

  sam2_model = build_sam2("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt")
  predictor = SAM2ImagePredictor(sam2_model)
  masks = SAM2AutomaticMaskGenerator(sam2_model).generate(image)
"""

from fusionsam_jax.models.sam2.amg import SAM2AutomaticMaskGenerator
from fusionsam_jax.models.sam2.build import HF_MODEL_ID_TO_FILENAMES, build_sam2, build_sam2_hf
from fusionsam_jax.models.sam2.predictor import SAM2ImagePredictor

__all__ = ["build_sam2", "build_sam2_hf", "HF_MODEL_ID_TO_FILENAMES", "SAM2ImagePredictor",
           "SAM2AutomaticMaskGenerator"]
