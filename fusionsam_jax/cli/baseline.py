r"""Fig. 7a baseline: SAM and SAM 2 zero-shot on the fused image and on the RGB image, ORACLE
prompts.

    python -m fusionsam_jax.baseline --workdir runs/mfnet [--split test] \
        [--sam2_checkpoint ckpt/sam2.1_hiera_l]

Restores the run's segmentation checkpoint (``--checkpoint best``), computes the fused image
of every image of the split with the trained (frozen) fusion path, prompts the run's SAM
(``model.sam_checkpoint``, or ``--sam_checkpoint``) once per connected component of each
ground-truth class with its box and centre point (ORACLE prompts: SAM is told where every
object is, FusionSAM never is), paints the masks into a class map and scores it with the same
mIoU code as ``fusionsam_jax.evaluate``. Protocol: `fusionsam_jax.evaluators.sam_zero_shot`.
With SAM 2 weights (``--sam2_checkpoint DIR`` converted with tools/convert_sam2_weights.py,
default ``model.sam2_checkpoint``) SAM 2 (`Sam2ImagePredictor`) gets the same prompts and the
same scoring: its rows print beside SAM's and fill the JSON's ``sam2`` slot. SAM's rows
need SAM weights; with only SAM 2 weights SAM is skipped (said in the output).
Prints the table beside FusionSAM's own row (from ``WORKDIR/eval_<split>_best.json`` when
that exists) and writes ``WORKDIR/baseline_<split>.json``.

Exit status: 0 done; 1 no checkpoint / missing data / no SAM or SAM 2 weights / bad
arguments.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from fusionsam_jax.cli import driver

HEAVY = True
REQUIRED = ("workdir",)


def run(workdir: str, split: str | None = None, checkpoint: str = "best",
        prompt: str = "box+point", min_area: int = 1, sam_checkpoint: str | None = None,
        out: str | None = None, sam2_checkpoint: str | None = None) -> dict:
  """Runs the baseline; returns the JSON record (also written to `out`). Raises on errors."""
  from fusionsam_jax import experiment
  from fusionsam_jax.data.datasets import get as get_info
  from fusionsam_jax.errors import SamWeightsMissingError
  from fusionsam_jax.evaluators import sam_zero_shot as Z
  from fusionsam_jax.fsutil import atomic_write_json
  from fusionsam_jax.metrics.miou import format_iou_table
  from fusionsam_jax.models.sam.predictor import SamPredictor
  from fusionsam_jax.models.sam2.predictor import Sam2ImagePredictor

  from fusionsam_jax import workdir as W
  config = W.load_config(workdir)
  split = split or config.eval.split
  ckpt = sam_checkpoint or config.model.get("sam_checkpoint")
  ckpt2 = sam2_checkpoint or config.model.get("sam2_checkpoint")
  if not ckpt and not ckpt2:
    raise experiment.SetupError(
        "the run has no SAM weights (model.sam_checkpoint unset: a random SAM); SAM "
        "zero-shot needs the official weights: pass --sam_checkpoint DIR (converted with "
        "tools/convert_sam_weights.py) and / or --sam2_checkpoint DIR (converted with "
        "tools/convert_sam2_weights.py)")
  for what, path in (("SAM", ckpt), ("SAM 2", ckpt2)):
    if path and not os.path.isdir(path):
      raise SamWeightsMissingError(f"{what} checkpoint {path} does not exist")
  if config.model.task != "semantic":
    raise ValueError(f"the baseline scores semantic segmentation; this run is "
                     f"{config.model.task!r}")
  names = list(get_info(config.dataset).class_names)
  keys = ("fused", "rgb") if "rgb" in config.model.modalities else ("fused",)
  t0 = time.perf_counter()
  from fusionsam_jax.data.spec import eval_iterable
  ctx = experiment.context(config, workdir, progress=False)
  params, _, _ = experiment.restore_params(config, workdir,
                                           W.parse_checkpoint_arg(checkpoint), ctx=ctx)
  examples = list(Z.fused_examples(config, ctx.model, params,
                                   eval_iterable(config, ctx.spec.source(split))))
  cms = cms2 = None
  if ckpt:
    cms = Z.evaluate(SamPredictor.from_checkpoint(ckpt), examples, len(names),
                     image_keys=keys, prompt=prompt, min_area=min_area)
  if ckpt2:
    cms2 = Z.evaluate(Sam2ImagePredictor.from_checkpoint(ckpt2), examples, len(names),
                      image_keys=keys, prompt=prompt, min_area=min_area)
  own = os.path.join(workdir, f"eval_{split}_best.json")
  fusionsam = None
  if os.path.isfile(own):
    with open(own) as f:
      fusionsam = json.load(f)
  record = Z.summary(cms, names, prompt=prompt, split=split, num_images=len(examples),
                     fusionsam=None if fusionsam is None else
                     {"iou": fusionsam.get("iou"), "miou": fusionsam.get("miou"),
                      "source": own},
                     sam2_cms=cms2,
                     extra={"sam_checkpoint": ckpt, "sam2_checkpoint": ckpt2,
                            "min_area": min_area, "seconds": time.perf_counter() - t0})
  rows = {}
  for name, c in (("SAM", cms), ("SAM 2", cms2)):
    rows.update({f"{name} zero-shot ({k}, oracle)": cm.iou() for k, cm in (c or {}).items()})
  if fusionsam is not None:
    import numpy as np
    rows["FusionSAM"] = np.asarray([np.nan if fusionsam["iou"].get(n) is None
                                    else fusionsam["iou"][n] for n in names])
  print(f"{Z.ORACLE_NOTE}; prompt {prompt}; {split}: {len(examples)} images")
  print(format_iou_table(rows, names))
  if cms is None:
    print("SAM: not run (no SAM weights: pass --sam_checkpoint)")
  if cms2 is None:
    print("SAM 2: not run (no SAM 2 weights: pass --sam2_checkpoint)")
  out = out or os.path.join(workdir, f"baseline_{split}.json")
  atomic_write_json(record, out)
  print(f"wrote {out}")
  return record


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "workdir": flags.DEFINE_string("workdir", None, "training run folder", **d),
      "split": flags.DEFINE_string("split", None, "split (default config.eval.split)", **d),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", **d),
      "prompt": flags.DEFINE_enum("prompt", "box+point", ["box+point", "box", "point"],
                                  "ORACLE prompt per ground-truth component", **d),
      "min_area": flags.DEFINE_integer("min_area", 1, "smallest component prompted (px)", **d),
      "sam_checkpoint": flags.DEFINE_string("sam_checkpoint", None,
                                            "converted SAM (default model.sam_checkpoint)", **d),
      "sam2_checkpoint": flags.DEFINE_string(
          "sam2_checkpoint", None, "converted SAM 2 (tools/convert_sam2_weights.py; default "
          "model.sam2_checkpoint): adds the SAM 2 rows", **d),
      "out": flags.DEFINE_string("out", None, "JSON path (default WORKDIR/baseline_SPLIT.json)",
                                 **d),
      "compilation_cache": driver.compilation_cache_flag(fv),
  }


def body(f, args) -> int:
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  driver.quiet_logs()
  driver.enable_compilation_cache(f["compilation_cache"].value)
  run(f["workdir"].value, f["split"].value, f["checkpoint"].value, f["prompt"].value,
      f["min_area"].value, f["sam_checkpoint"].value, f["out"].value,
      f["sam2_checkpoint"].value)
  return 0


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  import sys
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  import sys
  driver.main(sys.modules[__name__])
