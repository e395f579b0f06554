"""TFDS builders (manual download) writing ArrayRecord without TensorFlow.

Features are ``tfds.features.Tensor`` with zlib encoding (numpy in, numpy out: no TF on the
write or the read path) and a ``Text`` name. Shuffling at write time is disabled, so records are
stored in sorted-name order (eval order is reproducible; training shuffles in the grain
sampler). Use :func:`fusionsam_jax.data.prepare.prepare_dataset` (validation, temp dir, atomic
rename) rather than calling ``download_and_prepare`` directly.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from fusionsam_jax.data import datasets
from fusionsam_jax.data.datasets import DatasetSpec, MODALITY_CHANNELS
from fusionsam_jax.data.paths import VERSION


def _features(info: DatasetSpec) -> tfds.features.FeaturesDict:
  zlib = tfds.features.Encoding.ZLIB
  feats = {
      m: tfds.features.Tensor(shape=(None, None, MODALITY_CHANNELS[m]),
                              dtype=np.uint8, encoding=zlib)
      for m in info.modalities
  }
  feats["label"] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib)
  feats["name"] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: the spec's layout lists and decodes samples; this class only writes
  them. One subclass per spec (`get_builder_cls`)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "ArrayRecord, zlib-encoded uint8 tensors, sorted-name order."}
  spec: DatasetSpec

  # Manual-download builders have no URL checksums file. TFDS locates one next to the
  # builder's source via ``code_path``, which (TFDS 4.9.10) needs the optional
  # ``importlib_resources`` backport for builders inside a package; no path, no lookup.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, grey_policy: str = "strict", plan=None, progress: bool = False,
               **kwargs):
    """``plan``: split -> samples from a validation pass (else listed from manual_dir).
    ``progress``: a tqdm bar (count, rate, ETA) per split while writing; TFDS's own bars
    know no total, so ``prepare`` turns them off."""
    self._grey_policy = grey_policy
    self._plan = plan
    self._progress = progress
    super().__init__(**kwargs)

# TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset X
# downloaded and prepared to <temporary folder>": nothing is downloaded here and that
# folder is renamed right after, so both lines mislead; ``prepare`` says where it went.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    info = self.spec
    return self.dataset_info_from_configs(
        description=f"{info.name}: modalities {', '.join(info.modalities)}; "
                    f"classes {', '.join(info.class_names)}; ignore index "
                    f"{info.ignore_index}. Source: {info.source}.",
        features=_features(info),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    plan = self._plan
    if plan is None:
      plan = self.spec.layout.list_splits(dl_manager.manual_dir)
    return {split: self._generate_examples(self._with_progress(samples, split))
            for split, samples in plan.items()}

  def _with_progress(self, samples, split: str):
    """`samples`, with a tqdm bar that opens when the split's writing starts."""
    if not self._progress:
      return samples

    def gen():
      with tqdm.tqdm(desc=f"Writing {self.spec.name} {split}", unit="sample",
                     total=len(samples)) as bar:
        for s in samples:
          yield s
          bar.update()
    return gen()

  def _generate_examples(self, samples):
    for sample in samples:
      yield sample.name, self.spec.layout.load(sample, self._grey_policy)


def _instructions(spec: DatasetSpec) -> str:
  return (f"Download {spec.source} and pass its folder as the manual dir. "
          f"Expected layout:\n{spec.layout.description}\n")


_CLASSES: dict[int, type] = {}


def get_builder_cls(name) -> type:
  """The TFDS builder class of dataset `name` (a name, ``custom:<folder>`` or a spec),
  made from its spec on first use."""
  spec = datasets.get(name)
  cls = _CLASSES.get(id(spec))
  if cls is None or cls.spec is not spec:
    doc = (f"{spec.name}: {'+'.join(spec.modalities)}, {spec.num_classes} classes; splits "
           f"{'/'.join(spec.splits)}.")
    cls = type(spec.name.capitalize(), (_Builder,), {
        "name": spec.name, "spec": spec, "__doc__": doc, "__module__": __name__,
        "MANUAL_DOWNLOAD_INSTRUCTIONS": _instructions(spec)}, skip_registration=True)
    _CLASSES[id(spec)] = cls
  return cls
