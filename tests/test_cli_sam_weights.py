"""The user's real path, on CPU at tiny sizes: an official `segment_anything` model saved as
a `.pth` -> the converter CLI -> the train CLI on the paper config (configs/mfnet.py, Eq. 1
jointly) with ``model.sam_checkpoint`` (no random SAM) -> a SIGKILL inside the segmentation
stage and a resume -> the evaluate CLI -> the predict CLI. Checkpoints hold only what each
stage trains, and the workdir refuses other SAM weights.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from _cli_helpers import NUM_SCENES, ROOT, env, run_module

MFNET_TINY = os.path.join(ROOT, "configs", "mfnet.py") + ":tiny,generated"


def _convert(root, seed):
  import torch
  from fusionsam_jax.models.sam.sam import SAM_PRESETS
  from sam_reference import build_torch_sam
  pth = root / f"sam_tiny_{seed}.pth"
  torch.save(build_torch_sam(SAM_PRESETS["tiny"], seed=seed).state_dict(), pth)
  out = root / f"ckpt_{seed}"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_sam_weights.py"),
                      "--checkpoint", str(pth), "--output", str(out)], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


def _train_args(work, data, ckpt):
  return [f"--config={MFNET_TINY}", f"--workdir={work}", f"--config.data_dir={data}",
          f"--config.generate.num={NUM_SCENES}", f"--config.model.sam_checkpoint={ckpt}",
          "--config.model.allow_random_sam=False",
          "--config.train.stages.segmentation.num_steps=10",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=8", "--noprogress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sam_weights")
  ckpt = _convert(root, seed=0)
  work, data = root / "run", root / "data"
  cmd = [sys.executable, "-m", "fusionsam_jax.train", *_train_args(work, data, ckpt)]
  seg = work / "checkpoints" / "segmentation"
  # Kill the first run (SIGKILL) once the segmentation stage has saved a checkpoint.
  p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and p.poll() is None:
    if seg.is_dir() and any(d.isdigit() and int(d) >= 2 for d in os.listdir(seg)):
      break
    time.sleep(0.05)
  killed = p.poll() is None
  if killed:
    p.send_signal(signal.SIGKILL)
  first_out = p.communicate(timeout=60)[0]
  r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, first_out[-2000:] + r.stdout[-3000:] + r.stderr[-3000:]
  return {"root": root, "ckpt": ckpt, "work": work, "data": data, "killed": killed,
          "stdout": r.stdout}


def test_train_with_converted_weights_resumes_after_sigkill(run):
  work = run["work"]
  assert run["killed"], "the first run finished before it could be killed"
  assert "randomly initialised" not in run["stdout"]
  assert "Eq. 1 jointly" in run["stdout"]
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  resumed = [r for r in rows if r["split"] == "segmentation/event" and "resumed_from_step" in r]
  assert resumed and resumed[-1]["resumed_from_step"] >= 2
  assert "mIoU(%)" in run["stdout"] and (work / "eval_test_best.json").exists()
  record = json.load(open(work / "sam_weights.json"))
  assert record["path"] == str(run["ckpt"]) and len(record["sha256"]) == 64


def test_checkpoints_hold_only_what_each_stage_trains(run):
  """No checkpoint holds the frozen SAM encoder; the segmentation stage's holds the
  tokenizers and FMP (Eq. 1 trains them), the fusion stage's does not."""
  def keys(stage):
    ck = run["work"] / "checkpoints" / stage
    step = max(int(d) for d in os.listdir(ck) if d.isdigit())
    meta = json.load(open(ck / str(step) / "state" / "_METADATA"))
    return {k for k in json.dumps(meta).replace('"', " ").replace("'", " ").split()}
  tok, fus, seg = keys("tokenizer"), keys("fusion"), keys("segmentation")
  assert "image_encoder" not in tok | fus | seg
  assert "tokenizer_rgb" in tok and "discriminator" in tok and "fmp" not in tok
  assert "fmp" in fus and "tokenizer_rgb" not in fus and "mask_decoder" not in fus
  assert {"tokenizer_rgb", "fmp", "fused_decoder", "mask_decoder", "point_prompt"} <= seg


def test_evaluate_and_predict_clis(run, tmp_path):
  work = run["work"]
  r = run_module("fusionsam_jax.evaluate", f"--workdir={work}", "--checkpoint=latest")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mIoU(%)" in r.stdout and "checkpoint latest" in r.stdout
  gen = run["data"] / "generated"
  (sig,) = os.listdir(gen)
  raw = gen / sig / "raw"
  out = tmp_path / "pred"
  r = run_module("fusionsam_jax.predict", f"--workdir={work}", "--input_dir", str(raw),
                 "--split", "test", "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  names = [n.strip() for n in open(raw / "test.txt") if n.strip()]
  assert names and all((out / "labels" / f"{n}.png").exists() for n in names)
  with Image.open(out / "labels" / f"{names[0]}.png") as im:
    assert im.size == (128, 96)


def test_other_sam_weights_are_refused(run):
  """`--config.model.sam_checkpoint` may re-point the weights, not change them."""
  import shutil
  other = run["root"] / "ckpt_other"       # the same files, one byte of one file changed
  shutil.copytree(run["ckpt"], other)
  meta = other / "sam_meta.json"
  meta.write_text(meta.read_text().replace("{", "{ ", 1))
  args = [a for a in _train_args(run["work"], run["data"], other) if "num_steps" not in a]
  r = run_module("fusionsam_jax.evaluate", *args[:-1], timeout=300)
  assert r.returncode == 1 and "not the ones" in r.stderr, r.stderr[-2000:]
  args = _train_args(run["work"], run["data"], run["root"] / "missing")
  r = run_module("fusionsam_jax.evaluate", *args[:-1], timeout=300)
  assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr[-2000:]
