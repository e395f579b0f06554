"""Builds a dataset's ArrayRecord files from the official (or generated) on-disk layout.

    python -m fusionsam_jax.data.prepare --dataset mfnet --manual_dir SRC --data_dir DST

Steps: (1) validation pass over every sample (decode + checks, writes nothing); (2) the TFDS
builder writes into a temporary folder inside DST; (3) the finished version folder is renamed
to ``DST/<dataset>/<version>``. A failure at any step leaves nothing under that name.
"""

from __future__ import annotations

import os
import tempfile

from fusionsam_jax import fsutil
from fusionsam_jax.data import builders, datasets
from fusionsam_jax.data.io import DatasetError, GREY_POLICIES, LayoutError
from fusionsam_jax.data.paths import dataset_dir, is_prepared  # noqa: F401 (re-exported)
from fusionsam_jax.data.sources import load_source

IF_EXISTS = ("error", "skip", "overwrite")


class PrepareWriteError(OSError):
  """The dataset could not be written (read-only or full disk, ...); nothing was left."""


def prepare_dataset(name: str, manual_dir, data_dir, *, grey_policy: str = "strict",
                    if_exists: str = "error", progress: bool = True,
                    num_threads: int | None = None) -> str:
  """Validates ``manual_dir`` and writes the dataset; returns the dataset folder.

  Args:
    name: a registered dataset ("mfnet", "fmb", "vdt", ...; generated sets use the layout
      they imitate), "custom" (the custom dataset in `manual_dir`: its dataset.json) or
      ``custom:<folder>``.
    manual_dir: folder in the dataset's layout (``spec.layout.description``).
    data_dir: output root; the dataset goes to ``data_dir/<name>/<version>``.
    grey_policy: "strict" (grey stored as 3 equal channels is reduced, colour is an error)
      or "luma" (colour converted to luma) for thermal / depth images.
    if_exists: what to do when the dataset is already prepared: "error" (FileExistsError),
      "skip" (return it unchanged) or "overwrite".
    progress: show tqdm bars.

  Raises:
    DatasetError (LayoutError, MissingFileError, CorruptImageError, ChannelError,
    SizeMismatchError, LabelRangeError, SplitListError) before anything is written.
  """
  import tensorflow_datasets as tfds


  if if_exists not in IF_EXISTS:
    raise ValueError(f"if_exists={if_exists!r}: expected one of {IF_EXISTS}")
  spec = datasets.resolve(name, manual_dir)
  name = spec.name
  final = dataset_dir(spec, data_dir)
  if os.path.exists(final):
    if if_exists == "skip" and is_prepared(spec, data_dir):
      return final
    if if_exists == "error":
      raise FileExistsError(f"{final}: dataset already prepared (use --if_exists=skip "
                            "or --if_exists=overwrite)")
# TFDS's bars have no total (no rate / ETA that means anything): the builder shows its own.
  tfds.disable_progress_bar()
  plan = spec.layout.validate(manual_dir, grey_policy=grey_policy, progress=progress,
                         num_threads=num_threads)
  try:
    os.makedirs(data_dir, exist_ok=True)
    fsutil.clean_orphans(data_dir, (f".{name}-building-",))
    tmp = tempfile.mkdtemp(prefix=fsutil.temp_prefix(f".{name}-building-"), dir=data_dir)
  except OSError as e:
    raise PrepareWriteError(f"{data_dir}: cannot write the {name} dataset there "
                            f"({e.strerror or e}); nothing was written") from None
  saved_tempdir = tempfile.tempdir
  try:
      # A new TFDS builder makes an empty mkdtemp() folder (for GCS metadata, off here) and
      # never removes it; keep it inside our temporary folder.
    tempfile.tempdir = tmp
    try:
      builder = builders.get_builder_cls(spec)(
          data_dir=os.path.join(tmp, "data"), file_format="array_record",
          grey_policy=grey_policy, plan=plan, progress=progress)
    finally:
      tempfile.tempdir = saved_tempdir
    builder.download_and_prepare(
        download_dir=os.path.join(tmp, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                     try_download_gcs=False))
    built = os.path.join(tmp, "data", name, builders.VERSION)
    if not os.path.isfile(os.path.join(built, "dataset_info.json")):
      raise RuntimeError(f"{built}: TFDS finished without writing dataset_info.json")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):  # overwrite: move the old one aside, then drop it
      old = os.path.join(tmp, "old")
      os.replace(final, old)
    os.replace(built, final)
  except DatasetError:
    raise
  except Exception as e:  # a full or read-only disk, TFDS / array_record write errors
    msg = e.strerror if isinstance(e, OSError) and e.strerror else (
        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if len(msg) > 300:
      msg = msg[:297] + "..."
    raise PrepareWriteError(f"{data_dir}: writing the {name} dataset failed ({msg}); "
                            "nothing was written") from e
  finally:
    fsutil.rmtree(tmp)
  return final


def split_sizes(name: str, data_dir) -> dict[str, int]:
  spec = datasets.get(name)
  return {s: len(load_source(spec, s, data_dir)) for s in spec.splits}


if __name__ == "__main__":   # python -m fusionsam_jax.data.prepare
  from fusionsam_jax.cli import driver, prepare
  driver.main(prepare)
