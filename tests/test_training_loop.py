"""run_stage: logging, eval-ranked checkpoints, images, skip of a completed stage."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionsam_jax import training as T
import _toy
from fusionsam_jax.stages import common as C


def _setup(tmp_path, num_steps):
  model = _toy.ToyModel()
  params = dict(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"])
  tx = C.make_optimizer(1e-2, 1e-3)
  state = T.TrainState.create(params, tx, rng=0)
  mesh = T.make_mesh(jax.devices()[:1])
  step = C.make_train_step(_toy.make_loss_fn(model), tx, mesh)
  it = _toy.make_loader(8, seed=0, kind="dataset")
  ckpt = T.StageCheckpointer(tmp_path / "ck", save_interval_steps=100, keep_latest=1,
                             best_k=1, stage="s")
  evals = iter([0.2, 0.7, 0.4])
  kw = dict(name="s", state=state, train_step=step, data_iter=it, num_steps=num_steps,
            mesh=mesh, checkpointer=ckpt, workdir=str(tmp_path), progress=False,
            eval_fn=lambda st: {"val_miou": next(evals)}, eval_every=2, log_every=2,
            image_fn=lambda st, s: {"example": np.full((4, 4, 3), 0.5, np.float32)},
            image_every=3, learning_rate=1e-2)
  return kw, ckpt


def test_run_stage_logs_evaluates_and_skips_when_done(tmp_path):
  kw, ckpt = _setup(tmp_path, 6)
  with ckpt:
    res = T.run_stage(**kw)
  assert not res.skipped and int(res.state.step) == 6 and res.last_eval == {"val_miou": 0.4}
  rows = T.read_metrics_jsonl(tmp_path / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "s/train"]
  val = [r for r in rows if r["split"] == "s/val"]
  assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in val] == [2, 4, 6]
  for key in ("loss", "mse", "reg", "grad_norm", "lr", "step_time", "pairs_per_s"):
    assert key in train[-1], key
  assert train[-1]["lr"] == pytest.approx(1e-2)
  assert glob.glob(str(tmp_path / "tensorboard" / "s" / "events.out.tfevents.*"))
  with T.StageCheckpointer(tmp_path / "ck", keep_latest=1, best_k=1) as ck:
    # eval-ranked: best (step 4, 0.7) and latest (6) are kept
    assert ck.all_steps() == [4, 6] and ck.best_step() == 4 and ck.is_stage_done()
    assert ck.metrics(4) == {"val_miou": 0.7}
  final = jax.tree.map(np.asarray, res.state.params)

  kw2, ckpt2 = _setup(tmp_path, 6)
  with ckpt2:
    res2 = T.run_stage(**kw2)
  assert res2.skipped and res2.start_step == 6
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(res2.state.params)):
    assert np.array_equal(a, np.asarray(b))


def test_run_stage_reports_exhausted_iterator(tmp_path):
  kw, ckpt = _setup(tmp_path, 6)
  kw["data_iter"] = iter([{"x": np.zeros((8, 8), np.float32),
                           "y": np.zeros((8, 2), np.float32)}])
  kw["eval_fn"] = None
  with ckpt, pytest.raises(RuntimeError, match="data iterator ran out at step 1 of 6"):
    T.run_stage(**kw)
  assert not os.path.exists(tmp_path / "ck" / "STAGE_DONE.json")
