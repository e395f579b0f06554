"""Fig. 7a baseline (SAM / SAM 2 zero-shot, ORACLE prompts): prompts from ground-truth
components, masks against the official segment_anything SamPredictor and sam2's
SAM2ImagePredictor on the same weights, scoring against IoU computed directly, and the CLI's
error path. (The CLI on a trained run: tests/test_cli_end_to_end.py for SAM,
tests/test_cli_sam2_backbone.py with the SAM 2 column.)"""

import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusionsam_jax.cli import baseline
from fusionsam_jax.data.generate import generate_scene
from fusionsam_jax.evaluators import sam_zero_shot as Z
from fusionsam_jax.models.sam.sam import SAM_PRESETS
from fusionsam_jax.models.sam.predictor import SamPredictor
from fusionsam_jax.models.sam.checkpoint import convert_state_dict, save_sam_checkpoint
import sam_reference as ref


def test_component_prompts_on_known_blobs():
  lab = np.zeros((20, 30), np.int32)
  lab[2:7, 3:8] = 2            # 5 x 5 square: box (3, 2, 8, 7), most interior pixel (5, 4)
  lab[10:12, 20:29] = 2        # a second component of class 2 (2 x 9)
  lab[15, 0] = 2               # a 1-pixel component
  lab[14:20, 10:13] = 3        # class 3, touching the image border (6 x 3)
  lab[0, :] = 255              # ignored
  ps = Z.component_prompts(lab)
  assert [(p.cls, p.area) for p in ps] == [(2, 25), (2, 18), (3, 18), (2, 1)]
  assert ps[0].box == (3.0, 2.0, 8.0, 7.0) and ps[0].point == (5.5, 4.5)
  assert ps[1].box == (20.0, 10.0, 29.0, 12.0)
  assert ps[2].box == (10.0, 14.0, 13.0, 20.0) and ps[2].point[0] == 11.5
  assert ps[3].box == (0.0, 15.0, 1.0, 16.0) and ps[3].point == (0.5, 15.5)
  for p in ps:   # every point lies on its own component
    assert lab[int(p.point[1]), int(p.point[0])] == p.cls
  assert [p.area for p in Z.component_prompts(lab, min_area=2)] == [25, 18, 18]


@pytest.fixture(scope="module")
def sams(tmp_path_factory):
  """The official SamPredictor and ours on the same random tiny SAM (converted weights)."""
  cfg = SAM_PRESETS["tiny"]
  tsam = ref.build_torch_sam(cfg, seed=3)
  # Random tiny SAM mask logits are ~0.05: scale the last hypernetwork layer so masks are
  # decided by clear margins (the same weights for both predictors).
  with torch.no_grad():
    for mlp in tsam.mask_decoder.output_hypernetworks_mlps:
      mlp.layers[-1].weight.mul_(200.0)
  sd = {k: v.numpy() for k, v in tsam.state_dict().items()}
  conv_cfg, params = convert_state_dict(sd)
  ckpt = tmp_path_factory.mktemp("sam") / "ckpt"
  save_sam_checkpoint(str(ckpt), conv_cfg, params)
  _, predictor_mod = ref.official()
  return predictor_mod.SamPredictor(tsam), SamPredictor.from_checkpoint(str(ckpt))


def _scene(i):
  el = generate_scene("mfnet", i, 0, 96, 128)
  return el["rgb"], el["label"].astype(np.int32)


def test_prompt_masks_match_official_sam(sams):
  official, ours = sams
  image, label = _scene(1)
  prompts = Z.component_prompts(label)
  assert prompts
  official.set_image(image)
  with jax.default_matmul_precision("highest"):
    ours.set_image(image)
    for p in prompts[:2]:
      for mode in Z.PROMPTS:
        with torch.no_grad():
          want = Z.prompt_mask(official, p, mode)
        got = Z.prompt_mask(ours, p, mode)
        assert got.shape == want.shape == label.shape
        assert 0 < want.sum() < want.size
        assert (got != want).mean() < 1e-3, (mode, (got != want).sum())


@pytest.fixture(scope="module")
def sam2s(tmp_path_factory):
  """sam2's SAM2ImagePredictor and ours on the same random tiny SAM 2, saved as a .pt and
  converted by tools/convert_sam2_weights.py."""
  pytest.importorskip("sam2")
  pytest.importorskip("hydra")
  import sam2_reference as ref2
  from fusionsam_jax.models.sam2.predictor import Sam2ImagePredictor
  tmp = tmp_path_factory.mktemp("sam2")
  tm, _ = ref2.converted_random(tmp, "tiny", seed=5)
  _, predictor_mod = ref2.official()
  official = predictor_mod.SAM2ImagePredictor(tm)
  s = tm.image_size   # the official predictor's feature sizes are those of a 1024 model
  official._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
  fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return official, Sam2ImagePredictor.from_checkpoint(str(tmp / "ckpt"), compiler_options=fast)


def test_sam2_prompt_masks_match_official_sam2(sam2s):
  """The SAM 2 column's masks: ours against Meta's SAM2ImagePredictor, every prompt mode."""
  official, ours = sam2s
  image, label = _scene(1)
  prompts = Z.component_prompts(label)
  assert prompts
  with torch.no_grad():
    official.set_image(image)
  checked = 0
  with jax.default_matmul_precision("highest"):
    ours.set_image(image)
    for p in prompts[:2]:
      for mode in Z.PROMPTS:
        with torch.no_grad():
          want = Z.prompt_mask(official, p, mode)
        got = Z.prompt_mask(ours, p, mode)
        assert got.shape == want.shape == label.shape
        checked += 0 < want.sum() < want.size
        assert (got != want).mean() < 1e-3, (mode, (got != want).sum())
  assert checked >= 3   # most masks are neither empty nor full
  # The whole image scored by both predictors: the same class map.
  with torch.no_grad():
    want = Z.segment_image(official, image, label)
  with jax.default_matmul_precision("highest"):
    got = Z.segment_image(ours, image, label)
  assert (got != want).mean() < 1e-3


def test_class_map_and_scores(sams):
  """Class map painted largest component first; its IoU from the confusion matrix equals
  per-class IoU counted directly."""
  _, ours = sams
  images = [_scene(i) for i in (1, 2)]
  examples = [{"rgb": im, "fused": im[:, ::-1].copy(), "label": lab} for im, lab in images]
  with jax.default_matmul_precision("highest"):
    cms = Z.evaluate(ours, examples, 9, image_keys=("fused", "rgb"))
    preds = [Z.segment_image(ours, im, lab) for im, lab in images]
  # Painting order: a mask of a later (smaller) component overwrites an earlier one.
  p = [Z.ComponentPrompt(1, 9, (0, 0, 3, 3), (1.5, 1.5)), Z.ComponentPrompt(2, 1, (1, 1, 2, 2),
                                                                            (1.5, 1.5))]
  m = [np.ones((3, 3), bool), np.eye(3, dtype=bool)]
  np.testing.assert_array_equal(Z.class_map((3, 3), p, m), [[2, 1, 1], [1, 2, 1], [1, 1, 2]])
  for c in range(9):
    inter = sum(((pr == c) & (lab == c)).sum() for pr, (_, lab) in zip(preds, images))
    union = sum(((pr == c) | (lab == c)).sum() for pr, (_, lab) in zip(preds, images))
    got = cms["rgb"].iou()[c]
    if union == 0:
      assert np.isnan(got)
    else:
      assert got == pytest.approx(inter / union)
  rec = Z.summary(cms, [str(i) for i in range(9)], prompt="box+point", split="test",
                  num_images=2)
  assert rec["protocol"].startswith("ORACLE") and rec["sam2"] is None
  assert set(rec["methods"]) == {"SAM zero-shot (fused)", "SAM zero-shot (rgb)"}
  rec = Z.summary(None, [str(i) for i in range(9)], prompt="box", split="test",
                  num_images=2, sam2_cms=cms)
  assert rec["methods"] == {}
  assert rec["sam2"]["methods"]["SAM 2 zero-shot (rgb)"]["miou"] == pytest.approx(
      cms["rgb"].summary([str(i) for i in range(9)])["miou"])


def test_cli_errors_in_one_line(tmp_path, capsys):
  assert baseline.main(["--workdir", str(tmp_path / "none")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "config.json" in err[0]
  assert baseline.main([]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--workdir is required" in err[0]
