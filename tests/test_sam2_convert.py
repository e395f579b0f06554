"""The SAM 2 converter CLI: variant detection, skipped video keys, clean rejections, atomic
output. Failure paths call the CLI's `main` in-process (same argv, same stderr, same exit
code); the parity tests run it as a subprocess."""

import hashlib
import importlib.util
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
pytest.importorskip("hydra")

import sam2_reference as ref
from fusionsam_jax.models.sam2.checkpoint import (infer_config, load_sam2_checkpoint,
                                                  read_sam2_meta)
from fusionsam_jax.models.sam2.sam2 import SAM2_PRESETS


def _cli():
  spec = importlib.util.spec_from_file_location(
      "convert_sam2_weights", os.path.join(ref.REPO, "tools", "convert_sam2_weights.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("conv2")
  model = ref.build_torch_sam2("tiny", seed=3)
  path = tmp / "tiny.pt"
  ref.save_checkpoint(model, path)
  return path, model


def _fails(capsys, argv, *needles):
  rc = _cli()(argv)
  err = capsys.readouterr().err
  assert rc != 0
  lines = [l for l in err.strip().splitlines() if l]
  assert len(lines) == 1, err  # one-line error, no traceback
  for n in needles:
    assert n in lines[0], lines[0]


def _only(tmp_path, *names):
  assert sorted(os.listdir(tmp_path)) == sorted(names)


def _args(pt, out, *extra):
  return ["--checkpoint", str(pt), "--output", str(out), *extra]


def test_converts_and_records_metadata(tiny_pt, tmp_path, capsys):
  pt, model = tiny_pt
  assert _cli()(_args(pt, tmp_path / "out")) == 0
  assert "(tiny)" in capsys.readouterr().out
  meta = read_sam2_meta(str(tmp_path / "out"))
  assert meta["variant"] == "tiny" and meta["source"] == "tiny.pt"
  assert meta["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
  sd = model.state_dict()
  video = [k for k in sd if not k.startswith(("image_encoder.", "sam_prompt_encoder.",
                                              "sam_mask_decoder.", "no_mem_embed"))]
  assert meta["skipped_video_keys"] == len(video) > 0
  _, params = load_sam2_checkpoint(str(tmp_path / "out"))
  # One leaf per layout rule, against the torch tensors.
  np.testing.assert_array_equal(params["image_encoder"]["trunk"]["pos_embed"],
                                sd["image_encoder.trunk.pos_embed"].numpy())
  trunk = params["image_encoder"]["trunk"]
  np.testing.assert_array_equal(trunk["blocks_1"]["attn"]["qkv"]["kernel"],
                                sd["image_encoder.trunk.blocks.1.attn.qkv.weight"].numpy().T)
  np.testing.assert_array_equal(params["image_encoder"]["neck"]["convs_0"]["conv"]["kernel"],
                                sd["image_encoder.neck.convs.0.conv.weight"].numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      params["sam_mask_decoder"]["output_upscaling"]["layers_0"]["kernel"],
      sd["sam_mask_decoder.output_upscaling.0.weight"].numpy().transpose(2, 3, 0, 1))
  np.testing.assert_array_equal(params["no_mem_embed"], sd["no_mem_embed"].numpy())
  _only(tmp_path, "out")


def test_presets_match_the_official_configs():
  """Each preset against Meta's sam2.1 yaml (and Hiera's defaults where the yaml is silent)."""
  import inspect
  from omegaconf import OmegaConf
  import sam2
  from sam2.modeling.backbones.hieradet import Hiera
  defaults = {k: v.default for k, v in inspect.signature(Hiera).parameters.items()}
  for name, config in ref.CONFIGS.items():
    model = OmegaConf.load(os.path.join(os.path.dirname(sam2.__file__), config)).model
    trunk = {**defaults, **OmegaConf.to_container(model.image_encoder.trunk)}
    cfg = SAM2_PRESETS[name]
    assert (cfg.embed_dim, cfg.num_heads) == (trunk["embed_dim"], trunk["num_heads"]), name
    assert cfg.stages == tuple(trunk["stages"]), name
    assert cfg.global_att_blocks == tuple(trunk["global_att_blocks"]), name
    assert cfg.window_spec == tuple(trunk["window_spec"]), name
    assert cfg.window_pos_embed_bkg_spatial_size == tuple(
        trunk["window_pos_embed_bkg_spatial_size"]), name
    assert cfg.image_size == model.image_size and cfg.d_model == model.image_encoder.neck.d_model
    assert cfg.scalp == model.image_encoder.scalp
    assert cfg.fpn_top_down_levels == tuple(model.image_encoder.neck.fpn_top_down_levels)
    assert model.image_encoder.neck.fpn_interp_model == "nearest"
    assert cfg.pred_obj_scores == model.pred_obj_scores
    assert cfg.pred_obj_scores_mlp == model.pred_obj_scores_mlp
    assert cfg.iou_prediction_use_sigmoid == model.iou_prediction_use_sigmoid
    assert model.use_high_res_features_in_sam and model.directly_add_no_mem_embed


def test_variant_detection_from_shapes(monkeypatch):
  """hiera_t and hiera_b+ (1 / 2 blocks in stage 1), built by `sam2` on the meta device."""
  import types
  linspace = torch.linspace  # Hiera calls .item() on it: keep that one on the CPU
  monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
  for name in ("hiera_t", "hiera_b+"):
    with torch.device("meta"):
      model = ref.build_torch_sam2(name, randomize=False, device="meta")
    fake = {k: types.SimpleNamespace(shape=tuple(v.shape)) for k, v in
            model.state_dict().items()}
    assert infer_config(fake) == SAM2_PRESETS[name], name


def test_model_type_mismatch(tiny_pt, tmp_path, capsys):
  pt, _ = tiny_pt
  _fails(capsys, _args(pt, tmp_path / "out", "--model_type", "hiera_l"), "hiera_l", "tiny")
  _fails(capsys, _args(pt, tmp_path / "out", "--model_type", "vit_h"), "vit_h", "expected")
  _only(tmp_path)


def test_missing_truncated_and_foreign_files(tiny_pt, tmp_path, capsys):
  pt, _ = tiny_pt
  _fails(capsys, _args(tmp_path / "nope.pt", tmp_path / "out"), "nope.pt", "no such file")
  bad = tmp_path / "trunc.pt"
  bad.write_bytes(pt.read_bytes()[: os.path.getsize(pt) // 2])
  _fails(capsys, _args(bad, tmp_path / "out"), "trunc.pt", "not a readable")
  sam1 = tmp_path / "sam1.pth"
  torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, sam1)
  _fails(capsys, _args(sam1, tmp_path / "out"), "sam1.pth", "not a SAM 2 checkpoint")
  _only(tmp_path, "trunc.pt", "sam1.pth")


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > PWNED2",))


def test_pickle_needing_code_execution_is_refused(tmp_path, capsys):
  bad = tmp_path / "evil.pt"
  torch.save({"model": {"image_encoder.x": _Evil()}}, bad)
  _fails(capsys, _args(bad, tmp_path / "out"), "evil.pt", "code execution")
  assert not os.path.exists("PWNED2") and not os.path.exists(os.path.join(ref.REPO, "PWNED2"))
  _only(tmp_path, "evil.pt")


def test_missing_unexpected_and_misshapen_keys(tiny_pt, tmp_path, capsys):
  _, model = tiny_pt
  sd = dict(model.state_dict())
  del sd["sam_mask_decoder.conv_s0.weight"]
  sd["sam_mask_decoder.extra.weight"] = torch.zeros(3)
  torch.save({"model": sd}, tmp_path / "keys.pt")
  _fails(capsys, _args(tmp_path / "keys.pt", tmp_path / "out"), "missing keys",
         "sam_mask_decoder/conv_s0/kernel", "unexpected keys", "sam_mask_decoder.extra.weight")
  sd = dict(model.state_dict())
  w = sd["image_encoder.trunk.blocks.2.attn.proj.weight"]
  sd["image_encoder.trunk.blocks.2.attn.proj.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)
  torch.save({"model": sd}, tmp_path / "shape.pt")
  _fails(capsys, _args(tmp_path / "shape.pt", tmp_path / "out"),
         "image_encoder.trunk.blocks.2.attn.proj.weight", "expected", "found")
  _only(tmp_path, "keys.pt", "shape.pt")


def test_existing_output_needs_overwrite(tiny_pt, tmp_path, capsys):
  pt, _ = tiny_pt
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  _fails(capsys, _args(pt, out), "already exists", "--overwrite")
  assert (out / "keep.txt").read_text() == "user data"
  # --overwrite replaces only a folder this converter wrote (issue 17, defect 2) ...
  _fails(capsys, _args(pt, out, "--overwrite"), "keep.txt", "only a checkpoint directory")
  assert sorted(os.listdir(out)) == ["keep.txt"]
  # ... never the folder holding the input, nor a SAM (1) checkpoint folder
  inp = out / "model.pt"
  inp.write_bytes(pt.read_bytes())
  _fails(capsys, _args(inp, out, "--overwrite"), "holds the input")
  assert sorted(os.listdir(out)) == ["keep.txt", "model.pt"]
  from fusionsam_jax.models.sam.checkpoint import write_params_dir
  sam1 = tmp_path / "sam1"
  write_params_dir(str(sam1), {"w": np.zeros(2, np.float32)}, {"format": "fusionsam_jax.sam/1"})
  _fails(capsys, _args(pt, sam1, "--overwrite"), "sam_meta.json")
  shutil.rmtree(out)
  shutil.rmtree(sam1)
  assert _cli()(_args(pt, out)) == 0
  assert _cli()(_args(pt, out, "--overwrite")) == 0   # its own output: replaced
  assert read_sam2_meta(str(out))["variant"] == "tiny"
  _only(tmp_path, "out")
