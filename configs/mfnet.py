r"""FusionSAM on MFNet (RGB + thermal, 9 classes, 480 x 640), paper settings.

Prepare the data and the SAM weights once, then train (all stages, resumable), evaluate:

    python -m fusionsam_jax.data.prepare --dataset mfnet --manual_dir PATH/TO/MFNet \
        --data_dir data_cache
    python tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output ckpt/sam_vit_h
    python -m fusionsam_jax.train --config configs/mfnet.py --workdir runs/mfnet
    python -m fusionsam_jax.evaluate --config configs/mfnet.py --workdir runs/mfnet

Variants (``configs/mfnet.py:ARG``, comma-separated): ``tiny`` (smoke run),
``generated`` (a generated MFNet-layout scene set instead of the real data), ``ablation_a``,
``ablation_b``, ``rgb_only``, ``thermal_only``, ``no_cache``. Any field can be overridden,
e.g. ``--config.train.batch_size=8 --config.perceptual_weights=ckpt/vgg16.npz``.

Settings: Adam lr 1e-4, weight decay 1e-3 (L2), batch 4, 100 epochs of the 784 train pairs
per stage (19 600 steps), full-size random scale (0.5-2) / crop / flip augmentation, SAM ViT-H
(bf16 encoder, cuDNN attention), best checkpoint by val mIoU (392 val pairs), test on the 393
test pairs.
"""

from fusionsam_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config("mfnet", num_classes=9, task="semantic",
                             modalities=("rgb", "thermal"), crop_size=(480, 640))
  return config_lib.apply_variants(c, arg)
