"""FusionSAM on a SAM 2 backbone (`model.backbone="sam2_*"`, config variant ``sam2``).

A random official `sam2` tiny model is saved as a .pt and converted by
tools/convert_sam2_weights.py. The backbone FusionSAM builds from it (preprocessing, Hiera
trunk, FPN neck, high-res projections, no_mem_embed) is checked against Meta's
SAM2ImagePredictor on the same image; then `configs/demo.py:tiny,sam2` trains (staged, with
the embedding cache of the three levels) and evaluates through the train / evaluate CLIs,
and the Fig. 7a baseline CLI prints its SAM 2 column on that run.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
pytest.importorskip("hydra")

import sam2_reference as ref
from _cli_helpers import DEMO_TINY, run_module, tiny_config, tiny_overrides
from fusionsam_jax.models import factory
from fusionsam_jax.models.fusionsam import FusionSAM, load_sam_weights


@pytest.fixture(scope="module")
def sam2_ckpt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sam2_backbone")
  tm, _ = ref.converted_random(tmp, "tiny", seed=4)
  return tm, tmp / "ckpt", tmp


def test_backbone_features_match_official_sam2(sam2_ckpt):
  """`FusionSAM.image_embeddings` of an image (as the fused image, in [0, 1]) with the
  converted weights = SAM2ImagePredictor.set_image's features of the same uint8 image."""
  tm, ckpt, tmp = sam2_ckpt
  c = tiny_config(tmp / "data", "tiny,sam2")
  c.model.sam2_checkpoint = str(ckpt)
  model = factory.build_model(c)
  assert model.sam2 is not None and model.sam.img_size == tm.image_size
  # The SAM-derived parts as init_params loads them (the rest stays abstract: not needed).
  params = load_sam_weights(factory.abstract_params(c, model), factory.sam_weights_path(c))
  image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
  with jax.default_matmul_precision("highest"):
    got = model.apply({"params": {"image_encoder": params["image_encoder"]}},
                      image[None].astype(np.float32) / 255.0,
                      method=FusionSAM.image_embeddings)
  _, predictor_mod = ref.official()
  official = predictor_mod.SAM2ImagePredictor(tm)
  s = tm.image_size
  official._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
  with torch.no_grad():
    official.set_image(image)
  f = official._features
  want = [f["image_embed"]] + list(f["high_res_feats"])
  assert len(got) == 3
  for g, w in zip(got, want):
    w = w.numpy().transpose(0, 2, 3, 1)
    assert g.shape == w.shape
    assert ref.rel_err(g, w) < 1e-4
  # The loaded decoder parts are SAM 2's mask decoder's.
  from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint
  _, p2 = load_sam2_checkpoint(str(ckpt))
  np.testing.assert_array_equal(
      params["mask_decoder"]["transformer"]["layers_0"]["mlp"]["layers_0"]["kernel"],
      p2["sam_mask_decoder"]["transformer"]["layers_0"]["mlp"]["layers_0"]["kernel"])
  np.testing.assert_array_equal(params["mask_decoder"]["class_tokens"][5],
                                p2["sam_mask_decoder"]["mask_tokens"]["embedding"][1])


def test_semantic_decoder_with_skips_matches_sam2_mask_decoder(sam2_ckpt):
  """SemanticMaskDecoder(high_res=True) with SAM 2's decoder weights, its class tokens set to
  SAM 2's output tokens (object score, IoU, 4 mask tokens) and hypernetwork MLPs 2..5 to SAM
  2's: its masks 2..5 are `sam2`'s `MaskDecoder.predict_masks` masks on the same inputs
  (transformer, upscaling with the stride-8 / stride-4 skips, hypernetworks)."""
  import jax.numpy as jnp
  from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint
  from fusionsam_jax.models.semantic_decoder import SemanticMaskDecoder
  tm, ckpt, _ = sam2_ckpt
  _, p2 = load_sam2_checkpoint(str(ckpt))
  md = p2["sam_mask_decoder"]
  rng = np.random.default_rng(1)
  b, e, c = 2, 16, 256
  x = {"emb": (b, e, e, c), "pe": (1, e, e, c), "sparse": (b, 3, c), "dense": (b, e, e, c),
       "s0": (b, 4 * e, 4 * e, c // 8), "s1": (b, 2 * e, 2 * e, c // 4)}
  x = {k: rng.normal(size=v).astype(np.float32) for k, v in x.items()}
  dec = SemanticMaskDecoder(6, c, high_res=True)
  args = (x["emb"], x["pe"], x["sparse"], x["dense"], np.ones((b, 8), np.float32),
          (x["s0"], x["s1"]))
  own = jax.jit(dec.init)(jax.random.PRNGKey(0), *args)["params"]
  params = dict(own, transformer=md["transformer"], output_upscaling=md["output_upscaling"],
                class_tokens=jnp.concatenate([md["obj_score_token"]["embedding"],
                                              md["iou_token"]["embedding"],
                                              md["mask_tokens"]["embedding"]]))
  for i in range(4):
    params[f"output_hypernetworks_mlps_{i + 2}"] = md[f"output_hypernetworks_mlps_{i}"]
  with jax.default_matmul_precision("highest"):
    masks, _ = jax.jit(dec.apply)({"params": params}, *args)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    want = tm.sam_mask_decoder.predict_masks(
        t(x["emb"]), t(x["pe"]), torch.from_numpy(x["sparse"]), t(x["dense"]),
        repeat_image=False, high_res_features=[t(x["s0"]), t(x["s1"])])[0].numpy()
  assert masks.shape == (b, 6, 4 * e, 4 * e) and want.shape == (b, 4, 4 * e, 4 * e)
  assert ref.rel_err(masks[:, 2:], want) < 1e-4


@pytest.fixture(scope="module")
def trained(sam2_ckpt):
  _, ckpt, tmp = sam2_ckpt
  data, work = tmp / "data", tmp / "run"
  r = run_module("fusionsam_jax.train", f"--config={DEMO_TINY},sam2", f"--workdir={work}",
                 f"--config.model.sam2_checkpoint={ckpt}", *tiny_overrides(data))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  return work, r.stdout


def test_tiny_sam2_backbone_trains_and_evaluates_via_cli(trained):
  work, out = trained
  assert "stage 'segmentation'" in out and "mIoU(%)" in out
  assert "randomly initialised" not in out
  assert "SAM 2 sam2_tiny" in out
  saved = json.load(open(work / "config.json"))
  assert saved["config"]["model"]["backbone"] == "sam2_tiny"
  # The embedding cache holds the three SAM 2 levels.
  (train_dir,) = [d for d in os.listdir(work / "embedding_cache") if d.startswith("train-")]
  cache = work / "embedding_cache" / train_dir
  e = np.load(cache / "embeddings.npy", mmap_mode="r")
  h0 = np.load(cache / "embeddings_1.npy", mmap_mode="r")
  h1 = np.load(cache / "embeddings_2.npy", mmap_mode="r")
  assert e.shape[1:] == (16, 16, 256) and h0.shape[1:] == (64, 64, 32)
  assert h1.shape[1:] == (32, 32, 64) and np.abs(np.asarray(h0[:2])).max() > 0
  r = run_module("fusionsam_jax.evaluate", f"--workdir={work}", "--checkpoint=latest",
                 "--split=test", "--noreport")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert "mIoU(%)" in r.stdout
  res = json.load(open(work / "eval_test_latest.json"))
  assert 0.0 <= res["miou"] <= 1.0 and res["num_images"] == 4


def test_baseline_cli_prints_the_sam2_column(trained, sam2_ckpt, tmp_path):
  """Fig. 7a with SAM 2: `python -m fusionsam_jax.baseline` on the trained run. Its SAM 2
  weights (model.sam2_checkpoint: the converted random official model) are the default for
  the SAM 2 rows, which print beside SAM's (--sam_checkpoint, a random tiny SAM) and
  FusionSAM's and fill the JSON's ``sam2`` slot. (SAM 2's masks against Meta's
  SAM2ImagePredictor: tests/test_baseline.py.)"""
  from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
  from fusionsam_jax.models.sam.checkpoint import save_sam_checkpoint
  work, _ = trained
  _, ckpt, _ = sam2_ckpt
  sam = tmp_path / "sam_tiny"
  save_sam_checkpoint(str(sam), SAM_PRESETS["tiny"],
                      Sam(SAM_PRESETS["tiny"]).init_params(jax.random.PRNGKey(0)))
  out = tmp_path / "b.json"
  r = run_module("fusionsam_jax.baseline", f"--workdir={work}", "--split=test",
                 f"--sam_checkpoint={sam}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ("SAM zero-shot (fused, oracle)", "SAM 2 zero-shot (fused, oracle)",
               "SAM 2 zero-shot (rgb, oracle)", "FusionSAM"):
    assert name in r.stdout, r.stdout
  assert "not run" not in r.stdout
  saved = json.load(open(out))
  assert saved["sam2_checkpoint"] == str(ckpt)
  for k in ("SAM 2 zero-shot (fused)", "SAM 2 zero-shot (rgb)"):
    m = saved["sam2"]["methods"][k]
    assert 0 < m["num_pixels"] <= 4 * 96 * 128 and 0.0 <= m["miou"] <= 1.0
  assert set(saved["methods"]) == {"SAM zero-shot (fused)", "SAM zero-shot (rgb)"}
  line = next(l for l in r.stdout.splitlines() if l.startswith("SAM 2 zero-shot (fused"))
  assert f"{100 * saved['sam2']['methods']['SAM 2 zero-shot (fused)']['miou']:.1f}" in line
