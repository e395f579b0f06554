r"""The tokenizer stage of the paper config with its GAN phase (Eq. 8) at full size, measured:
a random-init official ViT-H ``.pth`` -> the converter -> a generated 480 x 640 MFNet-layout
set -> prepare -> `experiment.train` on ``configs/mfnet.py`` stopped after the tokenizer
stage (the fusion and segmentation stages are not run), then the stage's ``metrics.jsonl``
read before and after ``disc_start``.

    python benchmarks/tokenizer_gan.py --steps 1600 \
        --out benchmarks/results/tokenizer_gan_1600_h200.json
    python benchmarks/tokenizer_gan.py --steps 1600 \
        --config.train.stages.tokenizer.disc_weight=0.08
    python benchmarks/tokenizer_gan.py --config configs/mfnet.py:tiny --height 96 \
        --width 128 --scenes 16 --steps 40 --log_every 5 --window 10          # CPU smoke

Reports per modality: the reconstruction loss (Eq. 5 as logged; the perceptual term of the
SAM encoder's early blocks, Eq. 7, is in the loss but not in this number) over windows before
and after the discriminator starts, its largest value after the start, the generator's
adversarial term and adaptive weight, the discriminator's loss / gradient norm (non-zero once
it trains), codebook perplexity and dead codes in the last training rows and in the stage's
val pass. Needs `segment_anything`. The config and its ``--config.X=Y`` overrides are the
train CLI's; the random ``.pth`` is of the config's ``model.sam_variant``. (The committed
``tokenizer_gan_1600_dw008_h200.json`` was run with an earlier ``--extra
train.stages.tokenizer.disc_weight=0.08`` flag, the same override.)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.train_runs import (make_pth, open_scratch, run, tiny_pth,  # noqa: E402
                                   user_path_commands)
from fusionsam_jax.cli.driver import parse_flags_or_exit  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "JSON output (the stage's metrics.jsonl is copied "
                           "beside it as <out>_metrics.jsonl)")
_SCRATCH = flags.DEFINE_string("scratch", "runs/tokenizer_gan", "scratch folder (deleted first)")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "mfnet.py"), "experiment config, as for train")
_SCENES = flags.DEFINE_integer("scenes", 80, "generated scenes (about half train)")
_H = flags.DEFINE_integer("height", 480, "scene height")
_W = flags.DEFINE_integer("width", 640, "scene width")
_STEPS = flags.DEFINE_integer("steps", 1600, "tokenizer steps")
_LOG_EVERY = flags.DEFINE_integer("log_every", 20, "metrics rows every this many steps")
_WINDOW = flags.DEFINE_integer("window", 200, "steps averaged before / after disc_start")


class _StageDone(Exception):
  """Raised when the trainer reaches the stage after the tokenizer stage."""


def _config(data: str, ckpt: str):
  from fusionsam_jax.config_lib import normalize_overrides
  c = normalize_overrides(_CONFIG.value)
  c.data_dir = data
  c.model.sam_checkpoint = ckpt
  c.model.allow_random_sam = False
  c.train.crop_size = (_H.value, _W.value)
  c.train.log_every = _LOG_EVERY.value
  c.train.stages.tokenizer.num_steps = _STEPS.value
  c.eval.after_training = False
  return c


def _mean(rows, key):
  vals = [r[key] for r in rows if key in r]
  return statistics.fmean(vals) if vals else None


def summarize(rows: list[dict], disc_start: int, window: int, modalities) -> dict:
  """Windows of the tokenizer stage's train rows before / after `disc_start`."""
  train = [r for r in rows if r.get("split") == "tokenizer/train"]
  before = [r for r in train if disc_start - window < r["step"] <= disc_start]
  after = [r for r in train if disc_start < r["step"] <= disc_start + window]
  last = [r for r in train if r["step"] > train[-1]["step"] - window]
  post = [r for r in train if r["step"] > disc_start]
  out = {"disc_start": disc_start, "window_steps": window, "rows": len(train),
         "d_loss_nonzero_rows_after_start": sum(abs(r.get("d_loss", 0.0)) > 0 for r in post),
         "rows_after_start": len(post),
         "d_loss": {"before": _mean(before, "d_loss"), "after": _mean(after, "d_loss"),
                    "last": _mean(last, "d_loss")},
         "d_grad_norm": {"before": _mean(before, "d_grad_norm"),
                         "after": _mean(after, "d_grad_norm"),
                         "last": _mean(last, "d_grad_norm")}}
  for m in modalities:
    k = f"{m}/rec"
    peak = max(post, key=lambda r: r[k], default=None)
    out[m] = {
        "rec": {"before": _mean(before, k), "after": _mean(after, k), "last": _mean(last, k),
                "max_after_start": peak and peak[k],
                "max_after_start_step": peak and peak["step"]},
        "g_adv": {"after": _mean(after, f"{m}/g_adv"), "last": _mean(last, f"{m}/g_adv")},
        "adaptive_weight": {"after": _mean(after, f"{m}/adaptive_weight"),
                            "last": _mean(last, f"{m}/adaptive_weight")},
        "d_hinge": {"after": _mean(after, f"d/{m}/d_hinge"), "last": _mean(last, f"d/{m}/d_hinge")},
        "perplexity_last": _mean(last, f"{m}/perplexity"),
        "dead_codes_last": _mean(last, f"{m}/dead_codes"),
    }
  val = {k: v for r in rows if r.get("split", "").startswith("tokenizer/") and any(
      x.endswith("val_perplexity") for x in r) for k, v in r.items()}
  out["val"] = {k: v for k, v in val.items() if k.startswith(tuple(modalities))}
  return out


def main(argv):
  del argv
  scratch = os.path.abspath(_SCRATCH.value)
  open_scratch(scratch, False)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  res = {"benchmark": "tokenizer stage of configs/mfnet.py with the GAN phase, full size",
         "environment": environment(), "commands": {}}
  t_all = time.perf_counter()
  ckpt, data, work = (os.path.join(scratch, x) for x in ("ckpt", "data", "run"))
  config = _config(data, ckpt)
  variant = config.model.sam_variant
  pth = os.path.join(scratch, f"sam_{variant}_random.pth")
  res["make_pth_s"] = tiny_pth(pth) if variant == "tiny" else make_pth(variant, pth)
  py = sys.executable
  cmds = user_path_commands(py, pth, scratch, scenes=_SCENES.value, height=_H.value,
                            width=_W.value)
  for name, cmd in cmds.items():
    res["commands"][name] = run(cmd, os.path.join(scratch, f"{name}.log"), env)
    if res["commands"][name]["returncode"] != 0:
      write_json(_OUT.value or os.path.join(scratch, "result.json"), res)
      return 1

  from fusionsam_jax import experiment
  from fusionsam_jax.stages import tokenizer as tok_stage
  res["config"] = json.loads(config.to_json_best_effort())

  def hook(stage, step):
    if stage != "tokenizer":
      raise _StageDone
    return step

  t0 = time.perf_counter()
  try:
    experiment.train(config, work, progress=False, step_hook=hook)
  except _StageDone:
    pass
  res["train_s"] = time.perf_counter() - t0
  metrics = os.path.join(work, "metrics.jsonl")
  rows = [json.loads(x) for x in open(metrics)]
  start = tok_stage.disc_start(config, _STEPS.value)
  res["summary"] = summarize(rows, start, _WINDOW.value, tuple(config.model.modalities))
  res["total_s"] = time.perf_counter() - t_all
  print(json.dumps(res["summary"], indent=1))
  if _OUT.value:
    write_json(_OUT.value, res)
    shutil.copy(metrics, os.path.splitext(_OUT.value)[0] + "_metrics.jsonl")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags_or_exit)
