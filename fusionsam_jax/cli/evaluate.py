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

from absl import flags

from fusionsam_jax.cli import driver
from fusionsam_jax.config_lib import ATTN_IMPLS, ENCODER_DTYPES

HEAVY = True
REQUIRED = ("workdir",)


def run(config, workdir: str, checkpoint: str = "best", split: str | None = None, *,
        model_overrides: dict | None = None, markdown: bool = False,
        report: bool = False) -> int:
  """Evaluates; returns the exit status (prints errors). `split` may list several splits
  (``test,test_day,test_night``). `model_overrides`: `config_lib.override_model` keywords
  (attn_impl, encoder_dtype), applied after the config check. `report`: also write
  `evaluators.report` next to each JSON. `markdown`: print the paper-column table as
  Markdown."""
  from fusionsam_jax import config_lib, workdir as W
  from fusionsam_jax.data import paths, spec as D
  try:
    which = W.parse_checkpoint_arg(checkpoint)
    if config is None:
      config = W.load_config(workdir)
    else:
      config = W.config_for_evaluation(config, workdir)
    config_lib.override_model(config, **(model_overrides or {}))
    splits = [s.strip() for s in (split or config.eval.split).split(",") if s.strip()]
    # Checked before JAX builds anything: a typo answers in seconds.
    W.check_checkpoint_arg(workdir, which)
    where = D.data_spec(config)
    for s in splits:
      paths.check_split(where.name, where.data_dir, s)
    from fusionsam_jax import experiment
    cache: dict = {}
    for s in splits:
      summary = experiment.evaluate(config, workdir, which, s)
      emit_extras(config, workdir, summary, which, markdown=markdown, report=report,
                  cache=cache)
  except Exception as e:  # noqa: BLE001 -- the library's errors: one line (bugs re-raised)
    return driver.print_error(e)
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
  if report:
    from fusionsam_jax.evaluators.report import write_evaluation_report
    from fusionsam_jax.inference import Predictor
    cache = {} if cache is None else cache
    if "predictor" not in cache:
      cache["predictor"] = Predictor(workdir, which, config=config)
    paths = write_evaluation_report(config, workdir, summary, checkpoint=which,
                                    predictor=cache["predictor"])
    print(f"wrote {paths['report']}", flush=True)


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "config": driver.config_flag(fv, "experiment config (default: the one stored in "
                                   "--workdir)"),
      "workdir": flags.DEFINE_string("workdir", None, "training run folder", **d),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", **d),
      "split": flags.DEFINE_string("split", None, "split(s) to evaluate, comma-separated, "
                                   "e.g. test,test_day,test_night (None: config.eval.split, "
                                   "normally test)", **d),
      "markdown": flags.DEFINE_bool("markdown", False, "print the table of the paper's "
                                    "columns as Markdown", **d),
      "report": flags.DEFINE_bool("report", True, "write WORKDIR/report_<split>_<ckpt>/"
                                  "report.html (figures, samples, curves)", **d),
      "attn_impl": flags.DEFINE_enum("attn_impl", None, list(ATTN_IMPLS),
                                     "override model.attn_impl (None: the stored config's; "
                                     "cuDNN falls back to XLA by itself where absent)", **d),
      "encoder_dtype": flags.DEFINE_enum("encoder_dtype", None, list(ENCODER_DTYPES),
                                         "override model.encoder_dtype (None: the stored "
                                         "config's)", **d),
      "compilation_cache": driver.compilation_cache_flag(fv),
  }


def body(f, args) -> int:
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  config = driver.loaded_config(f["config"])
  driver.quiet_logs()
  driver.enable_compilation_cache(f["compilation_cache"].value)
  overrides = {k: f[k].value for k in ("attn_impl", "encoder_dtype") if f[k].value is not None}
  return run(config, f["workdir"].value, f["checkpoint"].value, f["split"].value,
             model_overrides=overrides, markdown=f["markdown"].value, report=f["report"].value)


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  import sys
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  import sys
  driver.main(sys.modules[__name__])
