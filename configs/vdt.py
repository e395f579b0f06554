r"""FusionSAM on VDT-2048 (visible + depth + thermal salient-object detection, 480 x 640).

    python -m fusionsam_jax.data.prepare --dataset vdt --manual_dir PATH/TO/VDT-2048 \
        --data_dir data_cache
    python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h
    python -m fusionsam_jax.train --config configs/vdt.py --workdir runs/vdt
    python -m fusionsam_jax.evaluate --config configs/vdt.py --workdir runs/vdt

The task is saliency: two classes (background, salient); evaluation prints S-measure, MAE,
E-measure and F-measure (adaptive / mean / max) of the salient-class probability, plus IoU.

Variants (``configs/vdt.py:ARG``, comma-separated): ``tiny``, ``generated``, ``ablation_a``,
``ablation_b``, ``rgb_only``, ``thermal_only``, ``depth_only``, ``no_cache``, and Table 3's
two-modality settings ``rgb_depth`` (RGB + D) and ``rgb_thermal`` (RGB + T); the default is
Table 3's RGB + D + T.

Settings: Adam lr 1e-4, weight decay 1e-3, batch 4, 100 epochs of the 943 train triplets
(1048 official less 105 val) per stage (23 500 steps), SAM ViT-H (bf16, cuDNN attention),
best checkpoint by val mIoU of the two classes.
"""

from fusionsam_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config("vdt", num_classes=2, task="saliency",
                             modalities=("rgb", "depth", "thermal"), crop_size=(480, 640))
  return config_lib.apply_variants(c, arg)
