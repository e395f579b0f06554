r"""Fig. 7b ablation study: train and evaluate every variant of one config, one table.

    python -m fusionsam_jax.ablate --config configs/demo.py --workdir_root runs/ablate_demo
    python -m fusionsam_jax.ablate --config configs/mfnet.py --workdir_root runs/ablate_mfnet \
        --variants full,ablation_a

Variants (paper Sec. 4.4, each a config variant of `config_lib.VARIANTS` applied on top of
``--config``, overrides included): ``full`` (the config as given), ``ablation_a`` ((A) no
LSTG: FMP on patch embeddings of the raw images), ``ablation_b`` ((B) FMP replaced by
concatenation + 1x1 conv) and one ``<modality>_only`` run per modality of the dataset
(RGB-only, thermal-only, depth-only where the dataset has depth). Each trains with
`experiment.train` in its own workdir ``WORKDIR_ROOT/<variant>`` (resumable like
``fusionsam_jax.train``: a finished variant is not retrained, an interrupted one continues
from its last checkpoint) and is evaluated with `experiment.evaluate` on the best checkpoint
(by val mIoU) on ``config.eval.split`` (its ``eval_<split>_best.json`` in that workdir).

Writes to ``WORKDIR_ROOT``: ``ablation.json`` (per variant: per-class IoU, mIoU, wall time,
the evaluation JSON it came from; machine, versions, command), ``ablation.md`` (the table as
Markdown) and ``ablation.png`` (mIoU bar chart); prints the table.

Exit status: 0 done; 1 bad input / setup; 2 usage; 3 non-finite loss; 4 a variant's workdir
was made by a different config.
"""


from __future__ import annotations

import sys

from absl import flags

from fusionsam_jax.cli import driver

HEAVY = True
REQUIRED = ("config", "workdir_root")


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "config": driver.config_flag(fv, "experiment config file (configs/*.py[:variant,...]); "
                                   "the full model of the study"),
      "workdir_root": flags.DEFINE_string("workdir_root", None, "folder of the variants' "
                                          "workdirs and the result files", **d),
      "variants": flags.DEFINE_list("variants", None, "variants to run, in order (default: "
                                    "full, ablation_a, ablation_b and <modality>_only for each "
                                    "modality)", **d),
      "progress": flags.DEFINE_bool("progress", True, "tqdm progress bars", **d),
      "compilation_cache": driver.compilation_cache_flag(fv),
  }


def body(f, args) -> int:
  from fusionsam_jax import ablation
  from fusionsam_jax.training.guards import NonFiniteLossError
  if args:
    raise driver.UsageError(f"unexpected arguments: {' '.join(args)}")
  config = driver.loaded_config(f["config"])
  names = f["variants"].value
  if names:
    bad = [n for n in names if n != "full" and n not in ablation.LABELS]
    if bad:
      raise driver.UsageError(f"--variants {','.join(bad)}: expected some of "
                              f"{', '.join(ablation.variant_names(config))}")
  driver.quiet_logs()
  driver.enable_compilation_cache(f["compilation_cache"].value)
  try:
    ablation.run(config, f["workdir_root"].value, names, progress=f["progress"].value)
  except NonFiniteLossError as e:
    print(f"error: training stopped: {e}. Re-run the same command to resume.",
          file=sys.stderr)
    return driver.EXIT_NONFINITE
  return 0


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
