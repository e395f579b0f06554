"""Random-access sources for the pipelines: prepared TFDS datasets or in-memory elements."""

from __future__ import annotations

from collections.abc import Sequence

from fusionsam_jax.data import datasets
from fusionsam_jax.data.paths import dataset_dir, is_prepared


def load_source(name: str, split: str, data_dir) -> Sequence[dict]:
  """Opens a prepared split as a random-access source (TFDS ``ArrayRecordDataSource``).

  ``split`` accepts TFDS split syntax, e.g. ``"train+val"`` (the full official train set of
  FMB / VDT-2048) or ``"train[:50%]"``. Elements are dicts of numpy arrays; ``name`` is bytes
  (the pipelines turn it into ``str``). The builder class need not be imported: the dataset
  is read from its folder (``data_dir/<name>/<version>``).
  """
  import tensorflow_datasets as tfds

  spec = datasets.get(name)
  if not is_prepared(spec, data_dir):
    raise FileNotFoundError(
        f"{dataset_dir(spec, data_dir)}: no prepared {spec.name} dataset; run "
        f"{spec.prepare_command(data_dir, 'SRC')}")
  builder = tfds.builder_from_directory(dataset_dir(spec, data_dir))
  return builder.as_data_source(split=split)


class InMemorySource(Sequence):
  """A list of elements as a random-access source (for generated scenes and tests)."""

  def __init__(self, elements):
    self._elements = list(elements)

  def __len__(self) -> int:
    return len(self._elements)

  def __getitem__(self, index):
    return self._elements[index]

  def __repr__(self) -> str:
    return f"InMemorySource(len={len(self)})"
