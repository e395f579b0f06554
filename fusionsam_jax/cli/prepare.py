"""Validate a downloaded (or generated) dataset and write it as TFDS ArrayRecord files.

    python -m fusionsam_jax.data.prepare --dataset mfnet --manual_dir /data/MFNet --data_dir data_cache
    python -m fusionsam_jax.data.prepare --dataset custom --manual_dir mydata --data_dir data_cache

Every sample is checked before anything is written (a missing modality file, a size mismatch,
a wrong channel count, a label out of range, a corrupt image: each named); the dataset is
built in a temporary folder and renamed to ``DATA_DIR/<dataset>/<version>``.

Exit status: 0 done; 1 a bad sample or an existing output (nothing written); 2 usage (an
unknown dataset, a folder without the dataset's layout).
"""

from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver
from fusionsam_jax.data import datasets
from fusionsam_jax.data import prepare as P
from fusionsam_jax.data.io import DatasetError, LayoutError

REQUIRED = ("dataset", "manual_dir", "data_dir")


def define(fv) -> dict:
  return {
      "dataset": flags.DEFINE_string(
          "dataset", None, f"which dataset: {', '.join(datasets.names())}, or custom (your "
          "own data: --manual_dir holds its dataset.json, docs/own_data.md)", flag_values=fv),
      "manual_dir": flags.DEFINE_string("manual_dir", None, "folder in the dataset's layout",
                                        flag_values=fv),
      "data_dir": flags.DEFINE_string("data_dir", None, "output root (DST/<dataset>/<version>)",
                                      flag_values=fv),
      "grey_policy": flags.DEFINE_enum(
          "grey_policy", "strict", list(P.GREY_POLICIES), "thermal/depth stored in colour: "
          "'strict' accepts only equal channels, 'luma' converts colour to luma",
          flag_values=fv),
      "if_exists": flags.DEFINE_enum("if_exists", "error", list(P.IF_EXISTS),
                                     "when DST/<dataset>/<version> exists", flag_values=fv),
      "progress": flags.DEFINE_bool("progress", True, "progress bars", flag_values=fv),
  }


def body(f, args) -> int:
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  dataset, data_dir = f["dataset"].value, f["data_dir"].value
  try:
    spec = datasets.resolve(dataset, f["manual_dir"].value)
  except ValueError as e:    # unknown name, a custom folder without a valid dataset.json
    raise driver.UsageError(str(e)) from None
  try:
    out = P.prepare_dataset(spec.key, f["manual_dir"].value, data_dir,
                            grey_policy=f["grey_policy"].value, if_exists=f["if_exists"].value,
                            progress=f["progress"].value)
  except LayoutError as e:
    raise driver.UsageError(str(e)) from None
  except (DatasetError, FileExistsError) as e:
    print(f"error: {e}\nNothing was written.", file=sys.stderr)
    return driver.EXIT_ERROR
  counts = ", ".join(f"{s}={n}" for s, n in P.split_sizes(spec.key, data_dir).items())
  print(f"prepared {spec.name} at {out} ({counts})")
  return 0


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
