"""train -> evaluate -> predict on a tiny generated scene set; resume; error paths.

One real `python -m fusionsam_jax.train` run (configs/demo.py:tiny, a few steps per stage)
is shared by the module; the other checks call the CLIs' functions in-process or run short
subprocesses that fail early.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from _cli_helpers import DEMO_TINY, run_module, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_e2e")
  data, work = root / "data", root / "run"
  r = run_module("fusionsam_jax.train", f"--config={DEMO_TINY}", f"--workdir={work}",
                 *tiny_overrides(data))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  return {"root": root, "data": data, "work": work, "stdout": r.stdout, "stderr": r.stderr}


def _raw_dir(data):
  gen = data / "generated"
  (sig,) = os.listdir(gen)
  return gen / sig / "raw"


def test_train_runs_all_stages_and_evaluates(trained):
  out, work = trained["stdout"], trained["work"]
  for stage in ("tokenizer", "fusion", "segmentation"):
    assert f"stage '{stage}'" in out
    assert os.path.exists(work / "checkpoints" / stage / "STAGE_DONE.json")
  assert "randomly initialised" in out                    # the demo says SAM is random
  assert "Perceptual loss (Eq. 7) is OFF" in out
  assert "mIoU(%)" in out and "unlabeled" in out           # the IoU table
  assert (work / "eval_test_best.json").exists()
  assert (work / "config.json").exists()
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  train_rows = [r for r in rows if r["split"] == "segmentation/train"]
  assert train_rows and all(k in train_rows[-1] for k in ("loss", "lr", "pairs_per_s",
                                                          "step_time"))
  assert any(r["split"] == "segmentation/val" and "val_miou" in r for r in rows)
  assert os.listdir(work / "tensorboard" / "segmentation")
  assert [d for d in os.listdir(work / "embedding_cache") if d.startswith("train-")]


def test_compile_time_is_reported_per_stage_and_per_run(trained):
  """The first step's event row splits its time (tracing, lowering, XLA compile or cache
  load) and the CLI's last line sums the whole run's compilation (issue 14 item 3)."""
  import re
  rows = [json.loads(line) for line in open(trained["work"] / "metrics.jsonl")]
  first_programs = 0
  for stage in ("tokenizer", "fusion", "segmentation"):
    (ev,) = [r for r in rows if r["split"] == f"{stage}/event" and "first_step_s" in r]
    parts = ev["compile_trace_s"] + ev["compile_lower_s"] + ev["compile_backend_s"]
    assert ev["compile_programs"] >= 1 and ev["compile_trace_s"] > 0, ev
    assert ev["compile_backend_s"] > 0 and ev["compile_cache_read_s"] <= ev["compile_backend_s"]
    assert 0 < parts <= ev["first_step_s"] + 1e-3, ev        # parts of a wall-clock span
    assert ev["compile_cache_hits"] <= ev["compile_cache_requests"] <= ev["compile_programs"]
    first_programs += ev["compile_programs"]
  m = re.search(r"compilation: (\d+) programs, ([0-9.]+) s \(tracing ([0-9.]+), lowering "
                r"([0-9.]+), XLA compile or cache load ([0-9.]+)", trained["stdout"])
  assert m, trained["stdout"][-2000:]
  programs, total, *parts = (float(x) for x in m.groups())
  assert programs >= first_programs                       # the steps and everything else
  assert total == pytest.approx(sum(parts), abs=0.2)


def test_evaluation_after_training_equals_a_fresh_restore(trained):
  """The train CLI evaluates the best checkpoint restored into its trained params; the
  evaluate CLI restores it into a fresh seeded init: the same numbers."""
  from fusionsam_jax.cli import evaluate as ev
  work = trained["work"]
  after = json.load(open(work / "eval_test_best.json"))
  os.rename(work / "eval_test_best.json", work / "eval_test_best.train.json")
  try:
    assert ev.run(None, str(work), "best", "test") == 0
    fresh = json.load(open(work / "eval_test_best.json"))
  finally:
    os.replace(work / "eval_test_best.train.json", work / "eval_test_best.json")
  assert fresh["step"] == after["step"] and fresh["num_images"] == after["num_images"]
  assert fresh["confusion_matrix"] == after["confusion_matrix"]


def test_tokenizer_stage_reports_codebook_use_on_val(trained):
  """The tokenizer stage's end-of-stage val row (issue 12 item 5): perplexity, dead codes
  and reconstruction error per modality, recomputed here from the raw val PNGs, the run's
  tokenizers and numpy."""
  import jax
  from fusionsam_jax import experiment
  from fusionsam_jax.models import factory
  from fusionsam_jax.models.fusionsam import FusionSAM
  from _cli_helpers import tiny_config
  rows = [json.loads(line) for line in open(trained["work"] / "metrics.jsonl")]
  (val,) = [r for r in rows if r["split"] == "tokenizer/val"]
  config = tiny_config(trained["data"])
  params, _, _ = experiment.restore_params(config, str(trained["work"]), "latest")
  raw = _raw_dir(trained["data"])
  names = open(raw / "val.txt").read().split()
  rgbt = np.stack([np.asarray(Image.open(raw / "images" / f"{n}.png")) for n in names])
  model = factory.build_model(config)
  k = config.model.tokenizer.num_codes
  for m, x in (("rgb", rgbt[..., :3]), ("thermal", rgbt[..., 3:])):
    x = x.astype(np.float32) / 255.0
    out = jax.device_get(model.apply({"params": params}, x, m, method=FusionSAM.tokenizer))
    p = np.bincount(np.asarray(out["indices"]).reshape(-1), minlength=k) / out["indices"].size
    perp = np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))
    assert val[f"{m}/val_perplexity"] == pytest.approx(perp, rel=1e-4), m
    assert val[f"{m}/val_dead_codes"] == pytest.approx(np.mean(p == 0)), m
    rec = np.mean(np.abs(np.asarray(out["recon"]) - x))     # the demo's Eq. 5 is l1
    assert val[f"{m}/val_rec"] == pytest.approx(rec, rel=1e-4), m


def _eval_latest(work):
  """The evaluate result of the fixture's run at its latest checkpoint (made once)."""
  from fusionsam_jax.cli import evaluate as ev
  path = work / "eval_test_latest.json"
  if not path.exists():
    assert ev.run(None, str(work), "latest", "test") == 0
  return json.load(open(path))


def test_predict_outputs_chain_into_metric_cli(trained, capsys):
  from fusionsam_jax.cli import evaluate as ev
  from fusionsam_jax.cli import predict
  from fusionsam_jax.data import inputs
  from fusionsam_jax.data.datasets.mfnet import SPEC as MFNET
  from fusionsam_jax.data.io import read_image
  work = trained["work"]
  assert ev.run(None, str(work), "latest", "test", markdown=True, report=True) == 0
  printed = capsys.readouterr().out
  assert "mIoU(%)" in printed and "checkpoint latest" in printed
  assert "| Method | Unlabeled | Car |" in printed and "| mAcc(%) |" in printed
  res = json.load(open(work / "eval_test_latest.json"))
  assert res["split"] == "test" and res["num_images"] == 4
  page = open(work / "report_test_latest" / "report.html").read()
  assert page.count("src='data:image/png;base64,") == 4        # matrix, IoU, samples, curves
  with Image.open(work / "report_test_latest" / "samples.png") as im:
    assert im.size[0] > im.size[1] > 300                      # 4 rows x 6 columns

  raw = _raw_dir(trained["data"])
  out = trained["root"] / "pred"
  assert predict.main(["--workdir", str(work), "--checkpoint", "latest", "--input_dir",
                       str(raw), "--split", "test", "--out", str(out)]) == 0
  names = [n.strip() for n in open(raw / "test.txt") if n.strip()]
  assert sorted(os.listdir(out)) == ["color", "fused", "labels", "overlay"]
  for n in names:
    for kind in ("labels", "color", "overlay", "fused"):
      with Image.open(out / kind / f"{n}.png") as im:
        assert im.size == (128, 96), (n, kind, im.size)
    lab = np.asarray(Image.open(out / "labels" / f"{n}.png"))
    assert lab.ndim == 2 and lab.max() < 9
    np.testing.assert_array_equal(np.asarray(Image.open(out / "color" / f"{n}.png")),
                                  np.asarray(MFNET.palette, np.uint8)[lab])
    rgb = read_image(raw / "images" / f"{n}.png")[..., :3]
    ov = np.asarray(Image.open(out / "overlay" / f"{n}.png"))
    np.testing.assert_array_equal(ov[lab == 0], rgb[lab == 0])   # class 0 not blended

  # The metric CLI takes predict's folder as it is (file names are the ground truth's) and
  # gives evaluate's numbers.
  r = run_module("fusionsam_jax.metrics.miou", "--pred_dir", str(out), "--gt_dir",
                 str(raw / "labels"), "--split_list", str(raw / "test.txt"),
                 "--num_classes", "9", "--json", str(trained["root"] / "chain.json"))
  assert r.returncode == 0, r.stderr
  assert "RuntimeWarning" not in r.stderr and "images: 4" in r.stdout
  chain = json.load(open(trained["root"] / "chain.json"))
  assert chain["confusion_matrix"] == res["confusion_matrix"]
  assert chain["miou"] == pytest.approx(res["miou"], abs=1e-12)
  assert chain["mean_class_accuracy"] == pytest.approx(res["mean_class_accuracy"], abs=1e-12)


def test_cudnn_bf16_workdir_runs_on_cpu(trained, tmp_path):
  """A workdir whose stored config says cuDNN attention + bf16 encoder (a GPU run) predicts
  and evaluates on this CPU: XLA attention instead, said once; --encoder_dtype float32 gives
  the numbers of the float32 / XLA run it was trained as."""
  import shutil
  from fusionsam_jax.cli import evaluate as ev
  work = trained["work"]
  ref = _eval_latest(work)
  gpu = tmp_path / "gpu_run"
  shutil.copytree(work / "checkpoints", gpu / "checkpoints")
  record = json.load(open(work / "config.json"))
  record["config"]["model"].update(attn_impl="cudnn", encoder_dtype="bfloat16")
  json.dump(record, open(gpu / "config.json", "w"))

  raw = _raw_dir(trained["data"])
  image = sorted(os.listdir(raw / "images"))[0]
  r = run_module("fusionsam_jax.predict", "--workdir", str(gpu), "--checkpoint", "latest",
                 "--inputs", str(raw / "images" / image), "--out", str(tmp_path / "o"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count("AttentionFallbackWarning") == 1, r.stderr[-3000:]
  assert (tmp_path / "o" / "labels" / image).exists()

  assert ev.run(None, str(gpu), "latest", "test",
                model_overrides={"encoder_dtype": "float32"}) == 0
  got = json.load(open(gpu / "eval_test_latest.json"))
  assert got["confusion_matrix"] == ref["confusion_matrix"]
  assert ev.run(None, str(gpu), "latest", "test", model_overrides={"attn_impl": "bogus"}) == 1


def test_predict_input_grouping(trained, tmp_path):
  from fusionsam_jax.cli import predict
  from fusionsam_jax.data import inputs
  from fusionsam_jax.data.io import read_image, write_png
  raw = _raw_dir(trained["data"])
  name = sorted(os.listdir(raw / "images"))[0]
  combined = read_image(raw / "images" / name)
  # An MFNet 4-channel PNG is one sample ...
  (s,) = inputs.samples_from_files([str(raw / "images" / name)], ("rgb", "thermal"))
  assert s[0] == name[:-4] and s[1]["rgb"].shape == (96, 128, 3)
  np.testing.assert_array_equal(s[1]["thermal"][..., 0], combined[..., 3])
  # ... separate files are paired by name (stem), per modality, never by order.
  for s in ("a", "b"):
    (tmp_path / "rgb").mkdir(exist_ok=True)
    (tmp_path / "t").mkdir(exist_ok=True)
    write_png(tmp_path / "rgb" / f"{s}.png", combined[..., :3])
    write_png(tmp_path / "t" / f"{s}.png", combined[..., 3])
  files = {"rgb": [str(tmp_path / "rgb" / f"{s}.png") for s in ("a", "b")],
           "thermal": [str(tmp_path / "t" / f"{s}.png") for s in ("b", "a")]}
  out = inputs.samples_from_modalities(files, ("rgb", "thermal"))
  assert len(out) == 2 and out[0][1]["thermal"].shape == (96, 128, 1)
  assert [n for n, _ in out] == ["a", "b"]
  with pytest.raises(inputs.InputError, match="both named 'a'"):   # one name twice
    inputs.samples_from_modalities(dict(files, rgb=files["rgb"][:1] * 2), ("rgb", "thermal"))
  with pytest.raises(inputs.InputError, match="no thermal image .* for name.s. b"):
    inputs.samples_from_modalities(dict(files, thermal=files["thermal"][1:]),
                                    ("rgb", "thermal"))
  files = [files["rgb"][0]]
  assert predict.main(["--workdir", str(trained["work"]), "--inputs", files[0],
                       "--out", str(tmp_path / "o")]) == 1   # missing thermal -> exit 1


def test_rerun_skips_completed_stages(trained, capsys):
  from fusionsam_jax import experiment
  work = trained["work"]
  before = open(work / "metrics.jsonl").read()
  cfg = tiny_config(trained["data"])
  cfg.eval.after_training = False
  result = experiment.train(cfg, str(work), progress=False)
  assert all(v["skipped"] for v in result.stages.values()), result.stages
  after = open(work / "metrics.jsonl").read()
  assert after == before   # no training step ran
  assert "already complete" in capsys.readouterr().out


def test_different_config_in_workdir_is_refused(trained, capsys):
  from fusionsam_jax.cli import train
  cfg = tiny_config(trained["data"])
  cfg.train.stages.segmentation.lr = 0.5
  assert train.run(cfg, str(trained["work"]), progress=False) == 4
  err = capsys.readouterr().err
  assert "different config" in err and "train.stages.segmentation.lr" in err


def test_evaluate_without_checkpoint_fails(tmp_path):
  r = run_module("fusionsam_jax.evaluate", f"--config={DEMO_TINY}", f"--workdir={tmp_path}",
                 f"--config.data_dir={tmp_path / 'data'}", timeout=300)
  assert r.returncode != 0
  assert "no segmentation-stage checkpoint" in r.stderr and "fusionsam_jax.train" in r.stderr


def test_unknown_lr_schedule_is_refused_before_any_work(tmp_path, capsys):
  from fusionsam_jax.cli import train
  from _cli_helpers import tiny_config
  c = tiny_config(tmp_path / "data")
  c.train.stages.segmentation.lr_schedule = "linear"
  assert train.run(c, str(tmp_path / "w"), progress=False) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("error: train.stages.segmentation.lr_schedule is 'linear'; expected one "
                     "of constant, cosine"), err
  assert not (tmp_path / "data").exists() and not (tmp_path / "w" / "config.json").exists()


def test_missing_dataset_and_sam_weights_messages(tmp_path, capsys):
  from fusionsam_jax.cli import train
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "mfnet_cfg", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                "mfnet.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.data_dir = str(tmp_path / "nothing")
  assert train.run(c, str(tmp_path / "w1"), progress=False) == 1
  err = capsys.readouterr().err
  assert "not prepared" in err and "python -m fusionsam_jax.data.prepare --dataset mfnet" in err

  c = mod.get_config()
  c.data_dir = str(tmp_path / "nothing")
  c.model.sam_checkpoint = str(tmp_path / "ckpt" / "sam_vit_h")
  from fusionsam_jax.errors import SamWeightsMissingError
  from fusionsam_jax.models import factory
  with pytest.raises(SamWeightsMissingError, match="convert_sam_weights.py"):
    factory.sam_weights_path(c)


def test_nonfinite_loss_stops_with_step_and_term(trained, tmp_path, capsys):
  import shutil
  import jax.numpy as jnp
  from fusionsam_jax.cli import train

  def inject_nan(stage, step_fn):  # a fusion loss term turns NaN at update 2
    if stage != "fusion":
      return step_fn

    def wrapped(state, frozen, batch):
      new, metrics = step_fn(state, frozen, batch)
      metrics = dict(metrics)
      bad = new.step == 2
      k = sorted(k for k in metrics if k not in ("loss", "grad_norm"))[0]
      metrics[k] = jnp.where(bad, jnp.nan, metrics[k])
      metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
      return new, metrics
    return wrapped

  # Start from the trained run's tokenizer stage (copied), so only the fusion stage runs.
  work = tmp_path / "nan"
  (work / "checkpoints").mkdir(parents=True)
  shutil.copy(trained["work"] / "config.json", work / "config.json")
  shutil.copytree(trained["work"] / "checkpoints" / "tokenizer", work / "checkpoints" / "tokenizer")
  cfg = tiny_config(trained["data"])
  cfg.train.checkpoint_every = 1
  cfg.train.log_every = 1
  assert train.run(cfg, str(work), progress=False, step_hook=inject_nan) == 3
  captured = capsys.readouterr()
  err = captured.err
  assert "non-finite loss term" in err and "at step 2" in err
  assert "last good checkpoint is step 1" in err
  assert "'loss'" not in err.split("(also")[0]   # the component term is named, not the total
  # the advice is one the workdir's config guard accepts (a changed lr needs the flag)
  assert "--config.train.stages.fusion.lr=<lower> --allow_config_change" in err
  assert err.count("\n") == 1
  assert "stage 'tokenizer' already complete" in captured.out
  fusion = work / "checkpoints" / "fusion"
  assert sorted(int(d) for d in os.listdir(fusion) if d.isdigit()) == [1]
  assert not (fusion / "STAGE_DONE.json").exists()

  # Following the advice: the lower lr is accepted with the flag (the checkpoints fit the
  # changed config), the stage resumes from step 1 and completes; the old config is kept.
  before = (work / "config.json").read_text()
  cfg.train.stages.fusion.lr = 1e-4
  cfg.train.stages.segmentation.num_steps = 0   # (a mutable key: keeps the test short)
  cfg.eval.after_training = False
  assert train.run(cfg, str(work), progress=False, allow_config_change=True) == 0
  out = capsys.readouterr().out
  assert "config of" in out and "train.stages.fusion.lr" in out
  assert (fusion / "STAGE_DONE.json").exists()
  (old,) = [f for f in os.listdir(work) if f.startswith("config.") and f != "config.json"]
  assert (work / old).read_text() == before
  assert json.load(open(work / "config.json"))["config"]["train"]["stages"]["fusion"]["lr"] \
      == 1e-4


@pytest.mark.extended  # the protocol vs official SAM: tests/test_baseline.py
def test_zero_shot_baseline_on_the_trained_run(trained, tmp_path, capsys):
  """Fig. 7a: `python -m fusionsam_jax.baseline` on the run (a random tiny SAM checkpoint:
  the demo has no official weights), table + JSON with the oracle note and a SAM 2 slot."""
  import jax
  from fusionsam_jax.cli import baseline
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
  from fusionsam_jax.models.sam.checkpoint import save_sam_checkpoint
  ckpt = tmp_path / "sam_tiny"
  save_sam_checkpoint(str(ckpt), SAM_PRESETS["tiny"],
                      Sam(SAM_PRESETS["tiny"]).init_params(jax.random.PRNGKey(0)))
  rec = baseline.run(str(trained["work"]), "test", sam_checkpoint=str(ckpt),
                     out=str(tmp_path / "b.json"))
  out = capsys.readouterr().out
  assert "ORACLE prompts" in out and "SAM zero-shot (fused, oracle)" in out
  assert "FusionSAM" in out and "mIoU(%)" in out
  saved = json.load(open(tmp_path / "b.json"))
  assert saved["num_images"] == rec["num_images"] == 4 and saved["sam2"] is None
  for k in ("SAM zero-shot (fused)", "SAM zero-shot (rgb)"):
    m = saved["methods"][k]
    assert 0 < m["num_pixels"] <= 4 * 96 * 128 and 0.0 <= m["miou"] <= 1.0
  assert saved["fusionsam"]["miou"] is not None


# -- faults on the trained run (docs/reliability.md) ---------------------------------------------


def _copy_run(trained, dest, stages=("tokenizer", "fusion", "segmentation"), cache=False):
  import shutil
  dest.mkdir(parents=True)
  for f in ("config.json", "sam_weights.json"):
    shutil.copy(trained["work"] / f, dest / f)
  for s in stages:
    shutil.copytree(trained["work"] / "checkpoints" / s, dest / "checkpoints" / s)
  if cache:
    shutil.copytree(trained["work"] / "embedding_cache", dest / "embedding_cache")
  return dest


def _assert_same_params(cfg, work_a, work_b):
  import jax
  from fusionsam_jax import experiment
  pa, sa, _ = experiment.restore_params(cfg, str(work_a), "latest")
  pb, sb, _ = experiment.restore_params(cfg, str(work_b), "latest")
  assert sa == sb
  la, lb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, a), (_, b) in zip(la, lb):
    assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def _truncate_arrays(step_dir):
  import glob
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  assert files
  for f in files:
    open(f, "w").close()


def test_corrupt_final_checkpoint_of_a_finished_stage_is_moved_aside_and_retrained(
    trained, tmp_path, capsys):
  """The tokenizer stage is complete but its final checkpoint is corrupt (its only one):
  the checkpoint goes to checkpoints/tokenizer_corrupt (said in one line), the stage is
  trained again in the same run, the later stages are kept, and the run's params are
  bitwise those of the uninterrupted run. An orphan of a killed run is removed, said."""
  from fusionsam_jax.cli import train
  work = _copy_run(trained, tmp_path / "w", cache=True)
  _truncate_arrays(work / "checkpoints" / "tokenizer" / "4")
  (work / "config.json.tmp-4242").write_text("{")
  cfg = tiny_config(trained["data"])
  cfg.eval.after_training = False
  assert train.run(cfg, str(work), progress=False) == 0
  out = capsys.readouterr()
  assert "Traceback" not in out.err
  assert "checkpoint 4 of stage 'tokenizer' is unusable" in out.out
  assert "stage 'tokenizer' was complete, but its final checkpoint 4 is unusable" in out.out
  assert "removed 1 temporary file(s)" in out.out and "config.json.tmp-4242" in out.out
  assert "stage 'fusion' already complete" in out.out
  assert len(os.listdir(work / "checkpoints" / "tokenizer_corrupt")) == 1
  assert (work / "checkpoints" / "tokenizer" / "STAGE_DONE.json").exists()
  _assert_same_params(cfg, trained["work"], work)
  # evaluate / predict refuse a finished stage whose final checkpoint is unusable (one
  # line, no silent fallback to an older one)
  from fusionsam_jax import experiment
  _truncate_arrays(work / "checkpoints" / "fusion" / "4")
  with pytest.raises(experiment.NoCheckpointError, match="re-run train"):
    experiment.restore_params(cfg, str(work), "latest")


def test_failed_config_change_leaves_the_workdir_as_it_was(trained, tmp_path, capsys):
  """--allow_config_change with a model the checkpoints do not fit: exit 4, one line
  naming the stage and param; config.json untouched, no checkpoint quarantined (also
  those of an unfinished stage)."""
  from fusionsam_jax.cli import train
  work = _copy_run(trained, tmp_path / "w")
  (work / "checkpoints" / "segmentation" / "STAGE_DONE.json").unlink()  # unfinished stage
  before = (work / "config.json").read_bytes()
  listing = sorted(os.path.relpath(os.path.join(r, f), work)
                   for r, _, fs in os.walk(work) for f in fs)
  cfg = tiny_config(trained["data"])
  cfg.model.tokenizer.num_codes = 32
  assert train.run(cfg, str(work), allow_config_change=True, progress=False) == 4
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not fit the checkpoints of stage 'tokenizer'" in err
  assert "in the checkpoint" in err and "Nothing was changed" in err
  assert (work / "config.json").read_bytes() == before
  after = sorted(os.path.relpath(os.path.join(r, f), work)
                 for r, _, fs in os.walk(work) for f in fs)
  assert after == sorted(listing + [".lock"])


def _kill_when(args, cond, timeout=400):
  """Runs the train CLI, SIGKILLs it as soon as `cond()` holds; returns its output."""
  import signal
  import subprocess
  import sys
  import time
  from _cli_helpers import ROOT, env
  log = args[-1]
  with open(log, "w") as fh:
    p = subprocess.Popen([sys.executable, "-m", "fusionsam_jax.train", *args[:-1]], cwd=ROOT,
                         env=env(), stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    try:
      while not cond():
        assert p.poll() is None, open(log).read()[-3000:]
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.02)
      p.send_signal(signal.SIGKILL)
    finally:
      p.wait()
  assert p.returncode == -signal.SIGKILL
  return open(log).read()


def _kill_points(rng, stage):
  """A random point of a tiny stage (4 steps, a checkpoint every step): after checkpoint
  1, 2 or 3, or (segmentation) while the embedding cache is built."""
  points = [("checkpoint", k) for k in (1, 2, 3)]
  if stage == "segmentation":
    points.append(("cache", 0))
  return points[rng.randrange(len(points))]


def _cond(work, log, stage, point):
  kind, k = point
  if kind == "cache":
    return lambda: os.path.exists(log) and "Embedding cache (train): building" in open(log).read()
  return lambda: (work / "checkpoints" / stage / str(k)).is_dir()


def _kill_and_resume(trained, work, stages, seed):
  import random
  rng = random.Random(seed)
  args = [f"--config={DEMO_TINY}", f"--workdir={work}", *tiny_overrides(trained["data"]),
          "--config.train.checkpoint_every=1", "--config.eval.after_training=False"]
  said = []
  for i, stage in enumerate(stages):
    point = _kill_points(rng, stage)
    said.append((stage, point))
    log = str(work.parent / f"run{i}.log")
    _kill_when(args + [log], _cond(work, log, stage, point))
  r = run_module("fusionsam_jax.train", *args)
  assert r.returncode == 0, (said, r.stdout[-3000:] + r.stderr[-3000:])
  cfg = tiny_config(trained["data"])
  _assert_same_params(cfg, trained["work"], work)
  for s in ("tokenizer", "fusion", "segmentation"):
    a = json.load(open(trained["work"] / "checkpoints" / s / "STAGE_DONE.json"))
    b = json.load(open(work / "checkpoints" / s / "STAGE_DONE.json"))
    assert a["last_eval"] == b["last_eval"] and a["step"] == b["step"], (s, said)
  assert not [d for d in os.listdir(work / "embedding_cache") if d.startswith(".")]
  rows = [json.loads(x) for x in open(work / "metrics.jsonl")]
  logged = [(x["split"], x["step"]) for x in rows if x["split"].endswith(("/train", "/val"))]
  assert len(logged) == len(set(logged)), said   # nothing logged twice across the kills
  return r, said


def test_sigkill_in_the_cached_segmentation_stage_resumes_bitwise(trained, tmp_path):
  """SIGKILL at a random point of the segmentation stage with the embedding cache on
  (while the cache is built, or after checkpoint 1-3), then the same command: the run's
  params and val metrics equal the uninterrupted run's bitwise (so does anything evaluated
  from them)."""
  work = _copy_run(trained, tmp_path / "w", stages=("tokenizer", "fusion"))
  r, said = _kill_and_resume(trained, work, ["segmentation"], seed=None)
  if said[0][1][0] == "checkpoint":
    rows = [json.loads(x) for x in open(work / "metrics.jsonl")]
    assert [x["resumed_from_step"] for x in rows if "resumed_from_step" in x] \
        == [said[0][1][1]], said


@pytest.mark.extended  # ~4 runs of the whole tiny pipeline; the one-stage version runs always
def test_sigkill_in_every_stage_resumes_bitwise(trained, tmp_path):
  """SIGKILL at a random point of each stage in turn (a fresh workdir), then the same
  command: bitwise the uninterrupted run."""
  work = tmp_path / "w"
  _kill_and_resume(trained, work, ["tokenizer", "fusion", "segmentation"], seed=None)
