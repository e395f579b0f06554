"""Re-draw a run's visual report from an evaluation JSON (no re-evaluation).

    python -m fusionsam_jax.evaluators.report --workdir runs/demo [--result eval_test_best.json]

Writes ``WORKDIR/report_<split>_<ckpt>/report.html`` (or ``--out``): confusion matrix,
per-class IoU, a qualitative grid of a fixed seeded choice of images, training curves
(`fusionsam_jax.evaluators.report`).

Exit status: 0 done; 1 no such JSON / checkpoint / data; 2 usage.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from absl import flags

from fusionsam_jax.cli import driver

HEAVY = True
REQUIRED = ("workdir",)


def _checkpoint_of(result: Mapping) -> str | int:
  """The checkpoint an evaluation JSON names: "best", "latest" or "step N" -> N."""
  c = str(result.get("checkpoint", "best"))
  return int(c.split()[-1]) if c.startswith("step ") else c


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "workdir": flags.DEFINE_string("workdir", None, "training run folder", **d),
      "result": flags.DEFINE_string("result", "eval_test_best.json",
                                    "evaluation JSON (relative to --workdir, or a path)", **d),
      "out": flags.DEFINE_string("out", None, "output folder (None: report_<split>_<ckpt> "
                                 "next to the JSON)", **d),
      "samples": flags.DEFINE_integer("samples", 4, "images in the qualitative grid", **d),
      "seed": flags.DEFINE_integer("seed", 0, "seed of the choice of images", **d),
      "compilation_cache": driver.compilation_cache_flag(fv),
  }


def body(f, args) -> int:
  from fusionsam_jax import workdir as W
  from fusionsam_jax.evaluators.report import write_evaluation_report
  from fusionsam_jax.inference import Predictor
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  driver.quiet_logs()
  driver.enable_compilation_cache(f["compilation_cache"].value)
  workdir = f["workdir"].value
  path = f["result"].value
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(workdir, path)
  try:
    with open(path) as fh:
      result = dict(json.load(fh), path=path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a JSON file ({e})") from None
  config = W.load_config(workdir)
  which = _checkpoint_of(result)
  predictor = Predictor(workdir, which, config=config) if f["samples"].value > 0 else None
  paths = write_evaluation_report(config, workdir, result, predictor=predictor,
                                  checkpoint=which, num_samples=f["samples"].value,
                                  seed=f["seed"].value, out_dir=f["out"].value)
  print(f"wrote {paths['report']}")
  return 0


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  import sys
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  import sys
  driver.main(sys.modules[__name__])
