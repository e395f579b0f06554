"""S-measure, MAE, E-measure and F-measure (adaptive / mean / max) of saliency PNGs against
ground-truth PNGs (matched by file name), as PySODMetrics computes them.

    python -m fusionsam_jax.metrics.sod --pred_dir out/saliency --gt_dir VDT/Test/GT

Exit status: 0 done; 1 unreadable / unmatched files; 2 usage.
"""

from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver
from fusionsam_jax.fsutil import atomic_write_json
from fusionsam_jax.metrics import sod as S
from fusionsam_jax.metrics.miou import prediction_dir

REQUIRED = ("pred_dir", "gt_dir")


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "pred_dir": flags.DEFINE_string(
          "pred_dir", None, "saliency PNGs (or a predict output folder: its saliency/)", **d),
      "gt_dir": flags.DEFINE_string("gt_dir", None, "ground-truth mask PNGs, same names", **d),
      "json": flags.DEFINE_string("json", None, "write the results here (atomically)", **d),
      "curves": flags.DEFINE_bool("curves", False, "also write the 256-threshold curves "
                                  "(ascending t) to the JSON", **d),
  }


def body(f, args) -> int:
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  curves = f["curves"].value
  acc = S.evaluate_sod_dirs(prediction_dir(f["pred_dir"].value, "saliency"), f["gt_dir"].value)
  res = acc.results(curves=curves)
  print("  ".join(f"{k} {res[k]:.4f}" for k in S.RESULT_KEYS) + f"  images {res['num_images']}")
  if f["json"].value:
    out = {k: res[k] for k in S.RESULT_KEYS}
    out["num_images"] = res["num_images"]
    if curves:
      out["curves"] = {k: v.tolist() for k, v in res["curves"].items()}
    atomic_write_json(out, f["json"].value)
  return 0


def main(argv=None) -> int:
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
