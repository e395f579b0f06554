"""Checkpoints: corrupt-checkpoint fallback, best-k retention, iterator state, config guard."""

import glob
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionsam_jax import training as T
from fusionsam_jax.stages import common as C


def _state(v: float):
  params = {"enc": {"w": jnp.full((3, 2), v)}, "head": {"b": jnp.full((2,), v)}}
  tx = C.make_optimizer(1e-3, 1e-3)
  return T.TrainState.create(params, tx, rng=0).replace(step=jnp.int32(int(v)))


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())


# A failed Orbax/tensorstore read can leave a callback for an asyncio loop that Orbax has
# already closed; it surfaces later, at garbage collection, as an "unraisable" exception.
_ORBAX_GC_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _save_steps(ckpt, steps, metrics=None, it=None):
  for s in steps:
    if it is not None:
      next(it)
    ckpt.save(s, _state(s), data_iter=it, metrics=(metrics or {}).get(s), force=True)
  ckpt.wait()


def _truncate_arrays(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  assert files
  for f in files:
    open(f, "w").close()


@_ORBAX_GC_NOISE
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
  it = _iterator()
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=3, best_k=0) as ck:
    _save_steps(ck, [2, 4, 6], it=it)
    assert ck.all_steps() == [2, 4, 6]
    _truncate_arrays(tmp_path / "ck" / "6")
    it2 = _iterator()
    with caplog.at_level(logging.WARNING):
      r = ck.restore(_state(0), data_iter=it2, quarantine_corrupt=True)
    assert r.step == 4 and [s for s, _ in r.skipped] == [6]
    assert float(r.state.params["head"]["b"][0]) == 4.0 and int(r.state.step) == 4
    assert r.iterator_restored and it2.get_state() == {"next_index": 2}
    assert "checkpoint 6" in caplog.text and "could not be restored" in caplog.text
    # the corrupt step was moved aside, so training can write step 6 again
    assert ck.all_steps() == [2, 4]
    assert len(os.listdir(str(tmp_path / "ck") + "_corrupt")) == 1
    ck.save(6, _state(6), force=True)
    ck.wait()
    assert ck.restore(_state(0)).step == 6


@_ORBAX_GC_NOISE
def test_missing_file_and_bad_iterator_state_fall_back(tmp_path):
  it = _iterator()
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=3, best_k=0) as ck:
    _save_steps(ck, [1, 2, 3], it=it)
    os.remove(tmp_path / "ck" / "3" / "meta" / "metadata")
    (tmp_path / "ck" / "2" / "data_iter" / "process_0-of-1.json").write_text('{"form')
    r = ck.restore(_state(0), data_iter=_iterator())
    assert r.step == 1 and [s for s, _ in r.skipped] == [3, 2]
    # without the iterator the damaged iterator state of step 2 does not matter
    assert ck.restore(_state(0)).step == 2


@_ORBAX_GC_NOISE
def test_no_usable_checkpoint_raises(tmp_path):
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=2, best_k=0) as ck:
    assert ck.restore(_state(0)) is None  # empty directory: fresh start
    _save_steps(ck, [1, 2])
    for s in (1, 2):
      _truncate_arrays(tmp_path / "ck" / str(s))
    with pytest.raises(T.CheckpointRestoreError, match="no usable checkpoint.*step 2.*step 1"):
      ck.restore(_state(0))
    with pytest.raises(T.CheckpointRestoreError, match="no checkpoint for step 7"):
      ck.restore(_state(0), 7)


def test_best_k_by_validation_metric_and_latest_kept(tmp_path):
  miou = {2: 0.1, 4: 0.9, 6: 0.3, 8: 0.5, 10: 0.2}
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=1, best_k=2) as ck:
    _save_steps(ck, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                metrics={s: {"val_miou": v} for s, v in miou.items()})
    # best two by val_miou (4, 8) and the latest (11); unevaluated ones are not "best"
    assert ck.all_steps() == [4, 8, 11]
    assert ck.best_steps() == [4, 8] and ck.best_step() == 4
    assert ck.restore(_state(0), "best").step == 4
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=1, best_k=2) as ck:  # reopened
    assert ck.best_step() == 4 and ck.latest_step() == 11


def test_best_min_mode_and_missing_best(tmp_path):
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=1, best_k=1, best_metric="val_loss",
                           best_mode="min") as ck:
    with pytest.raises(T.CheckpointRestoreError, match="val_loss"):
      _save_steps(ck, [1])
      ck.restore(_state(0), "best")
    _save_steps(ck, [2, 3, 4], metrics={2: {"val_loss": 0.5}, 3: {"val_loss": 0.2},
                                        4: {"val_loss": 0.9}})
    assert ck.best_step() == 3 and ck.all_steps() == [3, 4]


def test_stage_done_marker_is_atomic_json(tmp_path):
  with T.StageCheckpointer(tmp_path / "ck", stage="fusion") as ck:
    assert not ck.is_stage_done()
    ck.mark_stage_done({"step": 5})
    assert ck.is_stage_done() and ck.stage_done_info() == {"stage": "fusion", "step": 5}
  assert not [f for f in os.listdir(tmp_path / "ck") if ".tmp-" in f]


def test_config_guard(tmp_path):
  cfg = {"model": {"d_c": 256}, "train": {"lr": 1e-4, "num_steps": 100}}
  fp = T.check_workdir_config(tmp_path, cfg, ignore=("train.num_steps",))
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["fingerprint"] == fp and stored["config"] == cfg
  # same config, or a change of an ignored key: fine
  cfg2 = {"model": {"d_c": 256}, "train": {"lr": 1e-4, "num_steps": 500}}
  assert T.check_workdir_config(tmp_path, cfg2, ignore=("train.num_steps",)) == fp
  bad = {"model": {"d_c": 128}, "train": {"lr": 1e-4, "num_steps": 100}}
  with pytest.raises(T.ConfigMismatchError, match=r"model\.d_c: 256 -> 128"):
    T.check_workdir_config(tmp_path, bad, ignore=("train.num_steps",))
  fp2 = T.check_workdir_config(tmp_path, bad, ignore=("train.num_steps",), allow_change=True)
  assert fp2 != fp and len(glob.glob(str(tmp_path / "config.*.json"))) == 1
  assert T.check_workdir_config(tmp_path, bad, ignore=("train.num_steps",)) == fp2


def test_config_guard_wildcard_matches_one_key_part(tmp_path):
  """``*`` in an ignored key stands for any one part: the fingerprint equals the one with
  every key spelled out (workdirs keep their fingerprint), and only those keys may change."""
  stages = {s: {"num_steps": 4, "lr": 1e-3} for s in ("tokenizer", "fusion", "segmentation")}
  cfg = {"train": {"stages": stages, "num_steps": 9}}
  pattern = ("train.stages.*.num_steps",)
  spelled = tuple(f"train.stages.{s}.num_steps" for s in stages)
  assert T.config_fingerprint(cfg, pattern) == T.config_fingerprint(cfg, spelled)
  assert T.config_fingerprint(cfg, pattern) != T.config_fingerprint(cfg)
  fp = T.check_workdir_config(tmp_path, cfg, ignore=pattern)
  longer = json.loads(json.dumps(cfg))
  longer["train"]["stages"]["fusion"]["num_steps"] = 40
  assert T.check_workdir_config(tmp_path, longer, ignore=pattern) == fp
  for key in ("lr", None):    # another stage key, and a num_steps outside the stages
    bad = json.loads(json.dumps(cfg))
    if key:
      bad["train"]["stages"]["fusion"][key] = 0.5
    else:
      bad["train"]["num_steps"] = 10
    with pytest.raises(T.ConfigMismatchError):
      T.check_workdir_config(tmp_path, bad, ignore=pattern)


def test_config_guard_reads_added_keys_at_their_old_value(tmp_path):
  """A workdir made before a config key existed (model.backbone) resumes with the key at the
  value that reproduces the old behaviour, and only then."""
  old = {"model": {"d_c": 256}}
  T.check_workdir_config(tmp_path, old)
  added = {"model.backbone": "sam"}
  new = {"model": {"d_c": 256, "backbone": "sam"}}
  fp = T.check_workdir_config(tmp_path, new, added=added)
  assert json.loads((tmp_path / "config.json").read_text())["config"] == new
  assert not glob.glob(str(tmp_path / "config.*.json"))
  assert T.check_workdir_config(tmp_path, new, added=added) == fp
  (tmp_path / "config.json").unlink()
  T.check_workdir_config(tmp_path, old)
  with pytest.raises(T.ConfigMismatchError, match=r"model\.backbone: 'sam' -> 'sam2_tiny'"):
    T.check_workdir_config(tmp_path, {"model": {"d_c": 256, "backbone": "sam2_tiny"}},
                           added=added)
  with pytest.raises(T.ConfigMismatchError, match="model.backbone"):
    T.check_workdir_config(tmp_path, new)   # without `added`: a difference
  # A config that never sets the key (a variant replacing the sub-dict that holds it) means
  # the same run as one that sets it to its `added` value, whichever was stored first.
  (tmp_path / "config.json").unlink()
  T.check_workdir_config(tmp_path, new, added=added)
  T.check_workdir_config(tmp_path, old, added=added)
  assert not glob.glob(str(tmp_path / "config.*.json"))


def test_config_guard_accepts_configdict(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict({"a": 1, "b": {"c": (1, 2)}})
  fp = T.check_workdir_config(tmp_path, cfg)
  cfg.b.c = (1, 3)
  with pytest.raises(T.ConfigMismatchError, match=r"b\.c"):
    T.check_workdir_config(tmp_path, cfg)
  assert fp == T.config_fingerprint({"a": 1, "b": {"c": [1, 2]}})


def _state_shaped(v: float, n: int):
  params = {"enc": {"w": jnp.full((3, n), v)}, "head": {"b": jnp.full((n,), v)}}
  tx = C.make_optimizer(1e-3, 1e-3)
  return T.TrainState.create(params, tx, rng=0).replace(step=jnp.int32(int(v)))


@_ORBAX_GC_NOISE
def test_checkpoint_of_another_model_is_a_mismatch_not_corruption(tmp_path):
  """A checkpoint whose param shapes / names differ from the model (a changed config) is
  refused with the differing params named, and never moved to *_corrupt."""
  from fusionsam_jax.training.checkpointing import CheckpointMismatchError
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=2, best_k=0) as ck:
    _save_steps(ck, [1, 2])
    with pytest.raises(CheckpointMismatchError, match=r"enc/w: \(3, 2\) in the checkpoint, "
                       r"\(3, 5\) now"):
      ck.restore(_state_shaped(0, 5), quarantine_corrupt=True)
    assert ck.all_steps() == [1, 2]
    assert not os.path.exists(str(tmp_path / "ck") + "_corrupt")
    assert ck.structure_differences(2, _state(0)) == []
    assert ck.restore(_state(0)).step == 2


@_ORBAX_GC_NOISE
def test_only_checkpoint_corrupt_is_quarantined_and_training_starts_afresh(tmp_path):
  said = []
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=2, best_k=0, stage="fusion",
                           say=said.append) as ck:
    _save_steps(ck, [3])
    _truncate_arrays(tmp_path / "ck" / "3")
    assert ck.verify(_state(0), 3) is not None
    assert ck.restore(_state(0), quarantine_corrupt=True) is None   # start from scratch
    assert ck.all_steps() == []
    (moved,) = os.listdir(str(tmp_path / "ck") + "_corrupt")
    assert moved.startswith("3-")
    assert len(said) == 2 and "checkpoint 3 of stage 'fusion' is unusable" in said[0]
    assert "starts from the beginning" in said[1]


def test_resumed_stage_drops_the_rows_logged_after_its_checkpoint(tmp_path):
  """metrics.jsonl: rows a killed run wrote after checkpoint 4 of stage 'b' (and a torn
  last line) go when the stage resumes from 4; other stages' rows stay."""
  from fusionsam_jax.training.logging import MetricWriter, read_metrics_jsonl
  w = MetricWriter(tmp_path, tensorboard=False)
  for s in (2, 4):
    w.write_scalars(s, {"loss": s}, split="a/train")
  for s in (2, 4, 6):
    w.write_scalars(s, {"loss": s}, split="b/train")
  w.write_scalars(5, {"first_step_s": 1.0}, split="b/event")
  with open(w.jsonl_path, "a") as fh:
    fh.write('{"step": 7, "spl')
  assert w.drop_rows_after(4, "b/") == 3
  rows = [(r["split"], r["step"]) for r in read_metrics_jsonl(w.jsonl_path)]
  assert rows == [("a/train", 2), ("a/train", 4), ("b/train", 2), ("b/train", 4)]
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

