"""benchmarks/schedule_time.py's projection of the paper schedule from measured stage
numbers (the GPU runs themselves: the command in the script's docstring)."""

import math

import pytest

from configs import mfnet


def test_projection_of_the_mfnet_schedule():
  from benchmarks import schedule_time as S
  c = mfnet.get_config()
  # The paper: 100 epochs of MFNet's 784 train pairs at batch 4 per stage (issue 14:
  # "3 stages x 100 epochs of 784 pairs = 19 600 steps each"); val every 5 epochs.
  stats = {"tokenizer": {"loop_step_ms": 100.0, "first_step_s": 50.0},
           "fusion": {"loop_step_ms": 40.0, "first_step_s": 20.0},
           "segmentation": {"loop_step_ms": 150.0, "first_step_s": 90.0,
                            "eval_s": [60.0, 2.4, 2.6]}}
  gen = {"train": 24, "val": 12, "test": 12}
  p = S.project(c, stats, epochs=100, train_pairs=784, val_pairs=392, test_pairs=393,
                gen_sizes=gen, cache=None, warm_compile={})
  for stage, ms in (("tokenizer", 100.0), ("fusion", 40.0), ("segmentation", 150.0)):
    assert p[stage]["steps"] == 19600
    assert p[stage]["train_s"] == pytest.approx(19600 * ms / 1000)
  seg = p["segmentation"]
  assert seg["evals"] == 20                          # 100 epochs / every 5
  per_pair = 2.5 / 12                                # median of the evals after the first
  assert seg["eval_s"] == pytest.approx(20 * 392 * per_pair)
  assert seg["test_eval_s"] == pytest.approx(393 * per_pair)
  want = (19600 * 0.29 + 50 + 20 + 90 + 20 * 392 * per_pair + 393 * per_pair)
  assert p["total_s"] == pytest.approx(want)
  # Staged: the embedding cache, 2 views of every train pair + the val images; each split's
  # first batch compiles, the rest costs the same per image.
  cs = mfnet.get_config("staged")
  views = cs.train.embedding_cache.num_views
  assert views == 2
  meta = {"train": {"build_s": 10.0, "first_batch_s": 4.0, "num_examples": 48, "batch_size": 4},
          "val": {"build_s": 5.0, "first_batch_s": 3.0, "num_examples": 12, "num_batches": 3}}
  q = S.project(cs, stats, epochs=100, train_pairs=784, val_pairs=392, test_pairs=393,
                gen_sizes=gen, cache=meta, warm_compile={})
  want_cache = (4.0 + (6.0 / 44) * (784 * 2 - 4)) + (3.0 + (2.0 / 8) * (392 - 4))
  assert q["segmentation"]["cache_build_s"] == pytest.approx(want_cache)
  assert math.isclose(q["total_s"] - p["total_s"], want_cache)


def test_extra_overrides_reach_the_projected_config():
  """--extra X=Y reaches the config the projection uses (a GPU run with
  --extra model.train_dtype=bfloat16 once died here after its training runs: absl refused
  the --config.X overrides on a private FlagValues)."""
  from absl import flags
  from absl.testing import flagsaver
  from benchmarks import schedule_time as S
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(extra=["model.train_dtype=float32", "model.attn_impl=xla",
                                  "train.stages.tokenizer.num_steps=7"]):
    c = S._load_config(False)
  assert (c.model.train_dtype, c.model.attn_impl) == ("float32", "xla")
  assert c.train.stages.tokenizer.num_steps == 7
  d = mfnet.get_config()                                       # none of them is the default
  assert (d.model.train_dtype, d.model.attn_impl) == ("bfloat16", "cudnn")
  assert d.train.stages.tokenizer.num_steps != 7
