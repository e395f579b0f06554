r"""FusionSAM on FMB (RGB + thermal, 15 classes, 600 x 800), paper settings.

    python -m fusionsam_jax.data.prepare --dataset fmb --manual_dir PATH/TO/FMB \
        --data_dir data_cache
    python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h
    python -m fusionsam_jax.train --config configs/fmb.py --workdir runs/fmb
    python -m fusionsam_jax.evaluate --config configs/fmb.py --workdir runs/fmb

Variants (``configs/fmb.py:ARG``, comma-separated): ``tiny``, ``generated``, ``ablation_a``,
``ablation_b``, ``rgb_only``, ``thermal_only``, ``no_cache``.

Settings: Adam lr 1e-4, weight decay 1e-3, batch 4, 100 epochs of the 1098 train pairs
(FMB's 1220 official train pairs less the 122 held out as val, docs/data.md) per stage
(27 400 steps), crops 600 x 800 (the full image) after random scale 0.5-2 and flip,
SAM ViT-H (bf16, cuDNN attention), best checkpoint by val mIoU, test on the 280 test pairs.
"""

from fusionsam_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config("fmb", num_classes=15, task="semantic",
                             modalities=("rgb", "thermal"), crop_size=(600, 800))
  return config_lib.apply_variants(c, arg)
