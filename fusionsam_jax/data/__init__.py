"""Datasets: specs, TFDS builders (ArrayRecord, no TensorFlow), grain pipelines, generated scenes.

    from fusionsam_jax import data
    data.generate_dataset("mfnet", "gen/mfnet", num=200, seed=0)       # official layout
    data.prepare_dataset("mfnet", "gen/mfnet", "data_cache")           # -> ArrayRecord
    train = data.load_source("mfnet", "train", "data_cache")
    loader = data.train_loader(train, batch_size=8, crop_size=(96, 128))
    batch = next(iter(loader))  # {"rgb", "thermal", "label", "name"} numpy, leading batch dim

Each dataset is one `datasets.DatasetSpec` (classes, palette, modalities, on-disk layout,
split rules, paper table): ``data.datasets.get("mfnet")``; ``get_info`` is the same function.

Heavier modules (TFDS, grain) are imported on first use of the names that need them.
"""

from fusionsam_jax.data import datasets
from fusionsam_jax.data.datasets import IGNORE_INDEX, DatasetSpec
from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.data.io import (ChannelError, CorruptImageError, DatasetError, LabelRangeError,
                                   LayoutError, MissingFileError, SizeMismatchError,
                                   SplitListError)

_LAZY = {
    "train_loader": "pipeline", "eval_loader": "pipeline", "num_eval_batches": "pipeline",
    "process_shard_options": "pipeline",
    "load_source": "sources", "InMemorySource": "sources",
    "prepare_dataset": "prepare", "is_prepared": "paths", "dataset_dir": "paths",
    "generate_dataset": "generate", "generate_scene": "generate",
    "generate_elements": "generate", "split_indices": "generate",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    module = importlib.import_module(f"fusionsam_jax.data.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'fusionsam_jax.data' has no attribute {name!r}")


__all__ = ["datasets", "IGNORE_INDEX", "DatasetSpec", "get_info", "DatasetError", "LayoutError",
           "MissingFileError", "CorruptImageError", "ChannelError", "SizeMismatchError",
           "LabelRangeError", "SplitListError", *_LAZY]
