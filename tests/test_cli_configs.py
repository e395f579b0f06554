"""configs/*.py: every config and variant builds; paper defaults; variant errors."""

import importlib.util
import os

import pytest

from fusionsam_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("name,dataset,k,mods", [
    ("mfnet", "mfnet", 9, ("rgb", "thermal")), ("fmb", "fmb", 15, ("rgb", "thermal")),
    ("vdt", "vdt", 2, ("rgb", "depth", "thermal")), ("demo", "mfnet", 9, ("rgb", "thermal"))])
def test_configs_build_with_every_variant(name, dataset, k, mods):
  mod = load(name)
  assert "python -m fusionsam_jax.train --config configs/" in mod.__doc__
  c = mod.get_config()
  assert c.dataset == dataset and c.model.num_classes == k and c.model.modalities == mods
  for field in ("data_dir", "seed", "model", "train", "eval", "perceptual_weights"):
    assert field in c
  for field in ("batch_size", "crop_size", "scale_range", "worker_count", "log_every",
                "eval_every", "checkpoint_every", "best_k", "stages"):
    assert field in c.train
  assert c.eval.split == "test" and c.eval.val_split == "val"
  for v in ("tiny", "ablation_a", "ablation_b", "rgb_only", "thermal_only", "no_cache",
            "tiny,rgb_only", "sam2", "tiny,sam2"):
    cv = mod.get_config(v)
    assert cv.variant == v
  assert mod.get_config("ablation_a").model.tokenizer_kind == "patch"
  assert mod.get_config("ablation_b").model.fusion == "concat"
  assert mod.get_config("rgb_only").model.modalities == ("rgb",)
  assert mod.get_config("thermal_only").model.modalities == ("thermal",)
  assert mod.get_config("tiny").model.sam_variant == "tiny"
  assert mod.get_config().model.backbone == "sam"
  if c.model.sam_variant == "tiny":   # the CPU demo: a tiny random SAM 2
    assert mod.get_config("sam2").model.backbone == "sam2_tiny"
  else:
    assert mod.get_config("sam2").model.backbone == "sam2_hiera_l"
    assert mod.get_config("sam2").model.sam2_checkpoint == "ckpt/sam2.1_hiera_l"
  assert mod.get_config("tiny,sam2").model.backbone == "sam2_tiny"
  with pytest.raises(ValueError, match="unknown config variant"):
    mod.get_config("tiyn")


def test_paper_defaults():
  c = load("mfnet").get_config()
  seg = c.train.stages.segmentation
  assert (seg.lr, seg.weight_decay, c.train.batch_size) == (1e-4, 1e-3, 4)
  assert seg.num_steps is None and seg.num_epochs == 100
  # Durations are epochs, turned into steps from the data's size at run time: MFNet's 784
  # training pairs at batch 4 are 196 steps an epoch; batch 8 keeps 100 epochs.
  from fusionsam_jax.data.spec import eval_every_steps, stage_steps
  assert stage_steps(c, "segmentation", 784) == 19600
  c8 = load("mfnet").get_config()
  c8.train.batch_size = 8
  assert stage_steps(c8, "tokenizer", 784) == 9800 and eval_every_steps(c8, 784) == 5 * 98
  c8.train.stages.fusion.num_steps = 30
  assert stage_steps(c8, "fusion", 784) == 30
  assert c.model.sam_variant == "vit_h" and c.model.encoder_dtype == "bfloat16"
  # Eq. 1 jointly by default; the official code's staged mode is a variant.
  assert c.model.attn_impl == "cudnn" and not c.model.freeze_fmp_in_segmentation
  assert load("mfnet").get_config("staged").model.freeze_fmp_in_segmentation
  assert c.perceptual_weights is None and c.get("generate") is None
  assert stage_steps(load("fmb").get_config(), "fusion", 1098) == 100 * (1098 // 4)
  assert load("vdt").get_config().model.task == "saliency"
  d = load("demo").get_config()
  assert d.generate.num > 0 and d.model.allow_random_sam and d.model.sam_checkpoint is None
  with pytest.raises(ValueError, match="depth"):
    load("mfnet").get_config("depth_only")


def test_config_roundtrip_through_json():
  from fusionsam_jax.training.guards import config_fingerprint, config_to_dict
  import json
  c = load("vdt").get_config("tiny")
  back = config_lib.config_from_dict(json.loads(json.dumps(config_to_dict(c))))
  assert back.model.modalities == ("rgb", "depth", "thermal")
  assert back.train.crop_size == (96, 128)
  assert config_fingerprint(back) == config_fingerprint(c)


def test_backbone_values_and_missing_sam2_weights(tmp_path):
  """model.backbone: "sam" or "sam2_<preset>"; a SAM 2 backbone without weights names the
  converter command (model.sam2_checkpoint), a wrong value the accepted ones."""
  from fusionsam_jax.errors import SamWeightsMissingError
  from fusionsam_jax.models import factory
  from fusionsam_jax.models.fusionsam import sam2_backbone_config
  from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS
  assert sam2_backbone_config("sam") is None
  assert sam2_backbone_config("sam2_hiera_l") == SAM2_PRESETS["hiera_l"]
  for bad in ("vit_h", "sam2_hiera_x", "sam2"):
    with pytest.raises(ValueError, match="sam2_hiera_l"):
      sam2_backbone_config(bad)
  c = load("mfnet").get_config("sam2")
  c.model.sam2_checkpoint = None
  with pytest.raises(SamWeightsMissingError, match="convert_sam2_weights.py"):
    factory.sam_weights_path(c)
  c.model.sam2_checkpoint = str(tmp_path / "nope")
  with pytest.raises(SamWeightsMissingError, match="does not exist"):
    factory.sam_weights_path(c)
  c.model.allow_random_sam, c.model.sam2_checkpoint = True, None
  assert factory.sam_weights_path(c) is None
  m = factory.build_model(c)
  assert m.sam2 == SAM2_PRESETS["hiera_l"] and m.sam.img_size == 1024


def test_vdt_table3_modality_settings():
  """Table 3 reports VDT-2048 with RGB + D, RGB + T and RGB + D + T: each is a config."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("vdt_cfg", os.path.join(ROOT, "configs", "vdt.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert tuple(mod.get_config().model.modalities) == ("rgb", "depth", "thermal")
  assert tuple(mod.get_config("rgb_depth").model.modalities) == ("rgb", "depth")
  assert tuple(mod.get_config("rgb_thermal").model.modalities) == ("rgb", "thermal")
  assert tuple(mod.get_config("tiny,rgb_thermal").model.modalities) == ("rgb", "thermal")
  with pytest.raises(ValueError, match="rgb_depth: dataset mfnet"):
    spec2 = importlib.util.spec_from_file_location("mf", os.path.join(ROOT, "configs", "mfnet.py"))
    m2 = importlib.util.module_from_spec(spec2)
    spec2.loader.exec_module(m2)
    m2.get_config("rgb_depth")
