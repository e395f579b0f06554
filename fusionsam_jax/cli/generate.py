"""Write a generated multimodal scene set in a dataset's on-disk layout (no download).

    python -m fusionsam_jax.data.generate --layout mfnet --out gen/mfnet --num 200 --seed 0

The scenes need fusion: every class is recognisable in at least one modality, not always the
same one (`fusionsam_jax.data.generate`). The same (layout, seed, index, size) gives the same
files.

Exit status: 0 done; 1 an output that exists (without --overwrite) or cannot be written;
2 usage.
"""

from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver
from fusionsam_jax.data import datasets
from fusionsam_jax.data import generate as G

REQUIRED = ("layout", "out")


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "layout": flags.DEFINE_enum("layout", None, [n for n in datasets.names()
                                                   if datasets.get(n).generator],
                                  "dataset layout to imitate", **d),
      "out": flags.DEFINE_string("out", None, "output folder (must be new or empty)", **d),
      "num": flags.DEFINE_integer("num", 200, "number of samples (all splits)", lower_bound=1,
                                  **d),
      "seed": flags.DEFINE_integer("seed", 0, "random seed", **d),
      "height": flags.DEFINE_integer("height", G.DEFAULT_SIZE[0], "image height", lower_bound=1,
                                     **d),
      "width": flags.DEFINE_integer("width", G.DEFAULT_SIZE[1], "image width", lower_bound=1,
                                    **d),
      "native": flags.DEFINE_bool("native", False, "use the dataset's native size (overrides "
                                  "--height/--width)", **d),
      "overwrite": flags.DEFINE_bool("overwrite", False, "replace a non-empty --out", **d),
      "progress": flags.DEFINE_bool("progress", True, "progress bar", **d),
  }


def body(f, args) -> int:
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  layout, out, num = f["layout"].value, f["out"].value, f["num"].value
  h, w = f["height"].value, f["width"].value
  if f["native"].value:
    h, w = datasets.get(layout).native_size
  try:
    splits = G.generate_dataset(layout, out, num, f["seed"].value, h, w,
                                overwrite=f["overwrite"].value, progress=f["progress"].value)
  except FileExistsError as e:
    raise ValueError(str(e)) from None
  sizes = ", ".join(f"{s}={len(v)}" for s, v in splits.items())
  print(f"wrote {num} {layout} samples ({h}x{w}) to {out}: {sizes}")
  return 0


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
