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


def _eval_latest(work):
  """The evaluate result of the fixture's run at its latest checkpoint (made once)."""
  from fusionsam_jax import evaluate as ev
  path = work / "eval_test_latest.json"
  if not path.exists():
    assert ev.run(None, str(work), "latest", "test") == 0
  return json.load(open(path))


def test_predict_outputs_chain_into_metric_cli(trained, capsys):
  from fusionsam_jax import evaluate as ev
  from fusionsam_jax import predict
  from fusionsam_jax.data.info import MFNET
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
  assert predict.main(["--workdir", str(work), "--checkpoint", "latest", "--input-dir",
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
  r = run_module("fusionsam_jax.metrics.miou", "--pred-dir", str(out), "--gt-dir",
                 str(raw / "labels"), "--split-list", str(raw / "test.txt"),
                 "--num-classes", "9", "--json", str(trained["root"] / "chain.json"))
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
  from fusionsam_jax import evaluate as ev
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
  from fusionsam_jax import predict
  from fusionsam_jax.data.io import read_image, write_png
  raw = _raw_dir(trained["data"])
  name = sorted(os.listdir(raw / "images"))[0]
  combined = read_image(raw / "images" / name)
  # An MFNet 4-channel PNG is one sample ...
  (s,) = predict.samples_from_files([str(raw / "images" / name)], ("rgb", "thermal"))
  assert s[0] == name[:-4] and s[1]["rgb"].shape == (96, 128, 3)
  np.testing.assert_array_equal(s[1]["thermal"][..., 0], combined[..., 3])
  # ... separate files group by modality, in the config's order.
  write_png(tmp_path / "a_rgb.png", combined[..., :3])
  write_png(tmp_path / "a_t.png", combined[..., 3])
  files = [str(tmp_path / "a_rgb.png"), str(tmp_path / "a_t.png")] * 2
  out = predict.samples_from_files(files, ("rgb", "thermal"))
  assert len(out) == 2 and out[0][1]["thermal"].shape == (96, 128, 1)
  with pytest.raises(predict.InputError, match="incomplete"):
    predict.samples_from_files(files[:3], ("rgb", "thermal"))
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
  from fusionsam_jax import train
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


def test_missing_dataset_and_sam_weights_messages(tmp_path, capsys):
  from fusionsam_jax import train
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
  from fusionsam_jax import train

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
  assert "stage 'tokenizer' already complete" in captured.out
  fusion = work / "checkpoints" / "fusion"
  assert sorted(int(d) for d in os.listdir(fusion) if d.isdigit()) == [1]
  assert not (fusion / "STAGE_DONE.json").exists()


@pytest.mark.extended  # the protocol vs official SAM: tests/test_baseline.py
def test_zero_shot_baseline_on_the_trained_run(trained, tmp_path, capsys):
  """Fig. 7a: `python -m fusionsam_jax.baseline` on the run (a random tiny SAM checkpoint:
  the demo has no official weights), table + JSON with the oracle note and a SAM 2 slot."""
  import jax
  from fusionsam_jax import baseline
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
  from fusionsam_jax.sam_checkpoint import save_sam_checkpoint
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

