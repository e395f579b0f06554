"""mIoU of predicted label PNGs against ground-truth label PNGs (files matched by name; one
confusion matrix over all images, as RTFNet / CMX compute it).

    python -m fusionsam_jax.metrics.miou --pred_dir out/labels --gt_dir MFNet/labels \
        --dataset mfnet --split_list MFNet/test.txt

Exit status: 0 done; 1 unreadable / unmatched files or values outside the classes; 2 usage.
"""

from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver
from fusionsam_jax.fsutil import atomic_write_json
from fusionsam_jax.metrics import miou as M

REQUIRED = ("pred_dir", "gt_dir")


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "pred_dir": flags.DEFINE_string(
          "pred_dir", None, "predicted class-id PNGs (or a predict output folder: its labels/)",
          **d),
      "gt_dir": flags.DEFINE_string("gt_dir", None, "ground-truth class-id PNGs, same names",
                                    **d),
      "num_classes": flags.DEFINE_integer("num_classes", None, "number of classes C (default: the --dataset's)",
                                          lower_bound=1, **d),
      "ignore_index": flags.DEFINE_integer("ignore_index", 255, "label value not counted", **d),
      "class_names": flags.DEFINE_string("class_names", None, "comma-separated, one per class",
                                         **d),
      "json": flags.DEFINE_string("json", None, "write the results here (atomically)", **d),
      "split_list": flags.DEFINE_string(
          "split_list", None, "only the ground truth named in this file (one name a line, e.g. "
          "MFNet/test.txt)", **d),
      "dataset": flags.DEFINE_string(
          "dataset", None, "the dataset's class names, palette and class count (mfnet, fmb, "
          "vdt, custom:/path/to/data); mfnet | fmb: also the paper's Table 1 / 2 columns and "
          "row", **d),
      "markdown": flags.DEFINE_bool("markdown", False, "print a Markdown table", **d),
      "palette_indices": flags.DEFINE_bool(
          "palette_indices", False, "count the indices of palette PNGs as class ids whatever "
          "their palette (default: only a grey-ramp or the dataset's palette says so; colours "
          "of the --dataset palette are mapped to their ids; others are refused)", **d),
  }


def body(f, args) -> int:
  from fusionsam_jax.data.datasets import get as get_info
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  num_classes, dataset = f["num_classes"].value, f["dataset"].value
  info = get_info(dataset) if dataset else None
  ignore_index = f["ignore_index"].value
  if info is not None and not f["ignore_index"].present:
    ignore_index = info.ignore_index
  if num_classes is None:
    if info is None:
      raise driver.UsageError("--num_classes is required (or --dataset, which knows it)")
    num_classes = info.num_classes
  names = None if f["class_names"].value is None else [
      s.strip() for s in f["class_names"].value.split(",")]
  if names is not None:
    M.class_names_for(names, num_classes)
  if names is None and info is not None and info.num_classes == num_classes:
    names = list(info.class_names)
  listed = (None if f["split_list"].value is None
            else M.read_name_list(f["split_list"].value))
  cm = M.evaluate_label_dirs(M.prediction_dir(f["pred_dir"].value), f["gt_dir"].value,
                             num_classes, ignore_index, listed,
                             palette=None if info is None else info.palette,
                             palette_indices=f["palette_indices"].value)
  summary = cm.summary(names)
  summary["num_images"] = cm.num_updates
  print(M.format_paper_table(summary, dataset=dataset, method="predictions",
                             paper_row=dataset is not None, markdown=f["markdown"].value))
  print(f"images: {cm.num_updates}")
  if f["json"].value:
    atomic_write_json(summary, f["json"].value)
  return 0


def main(argv=None) -> int:
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
