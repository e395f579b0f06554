r"""Evaluate a trained FusionSAM checkpoint at full resolution.

    python -m fusionsam_jax.evaluate --config configs/mfnet.py --workdir runs/mfnet
    python -m fusionsam_jax.evaluate --workdir runs/mfnet --checkpoint latest --split test_night

Restores the segmentation stage's checkpoint (``--checkpoint best`` by val mIoU, the default;
``latest``; or a step number), runs the whole split through the eval loader (every test
pixel counted exactly once: images padded, padding masked out), accumulates one confusion
matrix and prints the per-class IoU table in the layout of the paper's Tables 1/2. For
saliency (VDT-2048) it also prints S-measure, MAE, E-measure and F-measure (adaptive / mean /
max) of the salient-class probability. Results go to ``WORKDIR/eval_<split>_<checkpoint>.json``
(written atomically).

Also prints mAcc (mean class accuracy) and, for FMB, the table in the paper's Table 2 columns
(``--markdown``: as Markdown); ``--split test,test_day,test_night`` evaluates several splits in
one call. ``--report`` (on by default) writes ``WORKDIR/report_<split>_<checkpoint>/
report.html``: confusion matrix, per-class IoU beside the paper's row (real MFNet / FMB test
split), a qualitative grid of a fixed seeded choice of images, training curves.

Without ``--config`` the config stored in the workdir is used; with it, it must match that
config (evaluation settings such as ``--config.eval.batch_size`` may differ). A run trained
with cuDNN attention evaluates on a CPU (XLA attention is used instead, with a warning);
``--attn_impl`` / ``--encoder_dtype`` override the stored config's (e.g. ``--encoder_dtype
float32`` for a bf16 run on a CPU).

Exit status: 0 done; 1 no checkpoint / missing data / bad arguments; 4 config mismatch.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from fusionsam_jax.cli_common import DEFAULT_COMPILATION_CACHE, enable_compilation_cache
from fusionsam_jax.config_lib import ATTN_IMPLS as _ATTN_IMPLS
from fusionsam_jax.config_lib import ENCODER_DTYPES as _ENCODER_DTYPES


def run(config, workdir: str, checkpoint: str = "best", split: str | None = None, *,
        model_overrides: dict | None = None, markdown: bool = False,
        report: bool = False) -> int:
  """Evaluates; returns the exit status (prints errors). `split` may list several splits
  (``test,test_day,test_night``). `model_overrides`: `config_lib.override_model` keywords
  (attn_impl, encoder_dtype), applied after the config check. `report`: also write
  `evaluators.report` next to each JSON. `markdown`: print the paper-column table as
  Markdown."""
  from fusionsam_jax import config_lib, experiment, workdir as W
  from fusionsam_jax import training as T
  from fusionsam_jax.data import DatasetError
  from fusionsam_jax.cli_common import EXIT_CONFIG, EXIT_ERROR
  from fusionsam_jax.models.sam.checkpoint import CheckpointError
  try:
    which = experiment.parse_checkpoint_arg(checkpoint)
    if config is None:
      config = W.load_config(workdir)
    else:
      W.check_config_matches(config, workdir)
    config_lib.override_model(config, **(model_overrides or {}))
    splits = [s.strip() for s in (split or config.eval.split).split(",") if s.strip()]
    cache: dict = {}
    for s in splits:
      summary = experiment.evaluate(config, workdir, which, s)
      emit_extras(config, workdir, summary, which, markdown=markdown, report=report,
                  cache=cache)
  except T.ConfigMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  except (experiment.SetupError, CheckpointError, DatasetError, FileNotFoundError, ValueError,
          T.CheckpointRestoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  return 0


def emit_extras(config, workdir: str, summary: dict, which, *, markdown: bool,
                report: bool, cache: dict | None = None) -> None:
  """What evaluate adds to `experiment.evaluate`'s table: the paper-column table with mAcc
  (Markdown with `markdown`), and the visual report (`report`). `cache` keeps the report's
  predictor between splits (one restore and compile)."""
  from fusionsam_jax.data.datasets import paper_table
  from fusionsam_jax.metrics.miou import format_paper_table
  label = f"FusionSAM ({'+'.join(config.model.modalities)})"
  table = paper_table(str(summary.get("dataset", config.dataset)))
  partial = table is not None and len(table.columns) != len(summary["class_names"])
  if markdown or partial:   # the paper's column set (FMB: Table 2 shows 8 of 15 classes)
    print(format_paper_table(summary, method=label, markdown=markdown), flush=True)
  else:
    macc = summary.get("mean_class_accuracy")
    print("mean class accuracy (mAcc) " + ("-" if macc is None else f"{macc * 100:.2f}%"),
          flush=True)
  if report:
    from fusionsam_jax.evaluators.report import write_evaluation_report
    from fusionsam_jax.predict import Predictor
    cache = {} if cache is None else cache
    if "predictor" not in cache:
      cache["predictor"] = Predictor(workdir, which, config=config)
    paths = write_evaluation_report(config, workdir, summary, checkpoint=which,
                                    predictor=cache["predictor"])
    print(f"wrote {paths['report']}", flush=True)


def define_flags(fv=None) -> dict:
  """The flags, on `fv` (absl FlagValues; None: the global ones: defined only when run as a
  program, importing next to train.py must not clash)."""
  d = {} if fv is None else dict(flag_values=fv)
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "experiment config (default: the one stored in --workdir)", **d),
      "workdir": flags.DEFINE_string("workdir", None, "training run folder", **d),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", **d),
      "split": flags.DEFINE_string("split", None, "split(s) to evaluate, comma-separated, "
                                   "e.g. test,test_day,test_night (None: config.eval.split, "
                                   "normally test)", **d),
      "markdown": flags.DEFINE_bool("markdown", False, "print the table of the paper's "
                                    "columns as Markdown", **d),
      "report": flags.DEFINE_bool("report", True, "write WORKDIR/report_<split>_<ckpt>/"
                                  "report.html (figures, samples, curves)", **d),
      "attn_impl": flags.DEFINE_enum("attn_impl", None, list(_ATTN_IMPLS),
                                     "override model.attn_impl (None: the stored config's; "
                                     "cuDNN falls back to XLA by itself where absent)", **d),
      "encoder_dtype": flags.DEFINE_enum("encoder_dtype", None, list(_ENCODER_DTYPES),
                                         "override model.encoder_dtype (None: the stored "
                                         "config's)", **d),
      "compilation_cache": flags.DEFINE_string(
          "compilation_cache", DEFAULT_COMPILATION_CACHE, "JAX persistent compilation cache "
          "folder ('' = off): a second run loads its compiled steps", **d),
  }


def main(argv, f) -> int:
  from fusionsam_jax.cli_common import quiet_logs
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    return 2
  if not f["workdir"].value:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  quiet_logs()
  enable_compilation_cache(f["compilation_cache"].value)
  from fusionsam_jax.config_lib import normalize_overrides
  overrides = {k: f[k].value for k in ("attn_impl", "encoder_dtype") if f[k].value is not None}
  return run(normalize_overrides(f["config"].value), f["workdir"].value,
             f["checkpoint"].value, f["split"].value, model_overrides=overrides,
             markdown=f["markdown"].value, report=f["report"].value)


if __name__ == "__main__":
  from fusionsam_jax.cli_common import run_cli
  sys.exit(run_cli(define_flags, lambda f, rest: main(["evaluate"] + rest, f),
                   prog="python -m fusionsam_jax.evaluate", doc=__doc__, positional=True))
