r"""FusionSAM on your own data: a folder with ``dataset.json`` (docs/own_data.md).

    python -m fusionsam_jax.data.prepare --dataset custom --manual_dir mydata \
        --data_dir data_cache
    python -m fusionsam_jax.train --config configs/custom.py:mydata --workdir runs/mydata
    python -m fusionsam_jax.evaluate --workdir runs/mydata
    python -m fusionsam_jax.predict --workdir runs/mydata --input_dir mydata --split test \
        --out runs/mydata/pred

The argument after the colon is the data folder, optionally followed by variants
(``configs/custom.py:mydata,tiny``; the variants of every config: ``tiny``,
``ablation_a``, ``ablation_b``, ``rgb_only``, ``thermal_only``, ``depth_only``, ``staged``,
``no_cache``, ``sam2``). The class names, class count and modalities come from the folder's
``dataset.json`` when the config is loaded; a missing or malformed file fails in one line.

Settings: the paper's (Adam lr 1e-4, weight decay 1e-3, batch 4, 100 epochs per stage, SAM
ViT-H); crops of ``train.crop_size`` (480 x 640: override with
``--config.train.crop_size="(H, W)"`` for other image sizes; smaller images are padded).
"""

from fusionsam_jax import config_lib
from fusionsam_jax.data.datasets import custom
from fusionsam_jax.data.datasets import get as get_dataset

USAGE = ("configs/custom.py needs the data folder: --config configs/custom.py:/path/to/data "
         "(optionally ,tiny ...: configs/custom.py:/path/to/data,tiny)")


def get_config(arg=None):
  parts = [a.strip() for a in str(arg or "").split(",") if a.strip()]
  folders = [p for p in parts if p not in config_lib.VARIANTS]
  if len(folders) != 1:
    raise ValueError(USAGE + (f"; got {len(folders)} non-variant parts {folders}"
                              if folders else ""))
  spec = get_dataset(custom.key_for(folders[0]))   # reads dataset.json (LayoutError: 1 line)
  c = config_lib.base_config(spec.key, num_classes=spec.num_classes, task=spec.task,
                             modalities=spec.modalities, crop_size=(480, 640))
  return config_lib.apply_variants(c, ",".join(p for p in parts if p in config_lib.VARIANTS))
