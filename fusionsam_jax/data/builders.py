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

from fusionsam_jax.data import info as info_lib
from fusionsam_jax.data import layouts

from fusionsam_jax.data.paths import VERSION  # noqa: E402


def _features(info: info_lib.DatasetInfo) -> tfds.features.FeaturesDict:
  zlib = tfds.features.Encoding.ZLIB
  feats = {
      m: tfds.features.Tensor(shape=(None, None, info_lib.MODALITY_CHANNELS[m]),
                              dtype=np.uint8, encoding=zlib)
      for m in info.modalities
  }
  feats["label"] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib)
  feats["name"] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: the layout lists and decodes samples; this class only writes them."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "ArrayRecord, zlib-encoded uint8 tensors, sorted-name order."}
  layout: layouts.Layout

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
    info = self.layout.info
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
      plan = self.layout.list_splits(dl_manager.manual_dir)
    return {split: self._generate_examples(self._with_progress(samples, split))
            for split, samples in plan.items()}

  def _with_progress(self, samples, split: str):
    """`samples`, with a tqdm bar that opens when the split's writing starts."""
    if not self._progress:
      return samples

    def gen():
      import tqdm
      with tqdm.tqdm(desc=f"Writing {self.layout.info.name} {split}", unit="sample",
                     total=len(samples)) as bar:
        for s in samples:
          yield s
          bar.update()
    return gen()

  def _generate_examples(self, samples):
    for sample in samples:
      yield sample.name, self.layout.load(sample, self._grey_policy)


def _instructions(layout: layouts.Layout) -> str:
  return (f"Download {layout.info.source} and pass its folder as the manual dir. "
          f"Expected layout:\n{layout.description}\n")


class Mfnet(_Builder):
  """MFNet RGB-thermal urban scenes (9 classes); splits train/val/test/test_day/test_night."""

  name = "mfnet"
  layout = layouts.LAYOUTS["mfnet"]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(layout)


class Fmb(_Builder):
  """FMB RGB-infrared scenes (15 classes); val = last 10 % of sorted official train names."""

  name = "fmb"
  layout = layouts.LAYOUTS["fmb"]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(layout)


class Vdt(_Builder):
  """VDT-2048 visible-depth-thermal salient objects; val = last 10 % of sorted Train names."""

  name = "vdt"
  layout = layouts.LAYOUTS["vdt"]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(layout)


BUILDERS = {"mfnet": Mfnet, "fmb": Fmb, "vdt": Vdt}


def get_builder_cls(name: str):
  return BUILDERS[info_lib.get_info(name).name]
