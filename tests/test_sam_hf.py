"""Loading Hugging Face `facebook/sam-vit-*` weights without PyTorch: a transformers
`SamModel` with random weights, saved with `save_pretrained`, read by our loader, gives
the same image embeddings, masks and IoU predictions as `SamModel` itself."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")

from fusionsam_jax.models.sam.build import build_sam_vit_b, load_sam, sam_model_registry
from fusionsam_jax.models.sam.sam import SAM_PRESETS, Sam
from fusionsam_jax.models.sam.checkpoint import CheckpointError
import sam_reference as ref

TOL = 1e-4


def _transformers_sam():
  """transformers' SAM classes. The CUDA torchvision wheel here does not import beside the
  CPU torch (and tests may register a torchvision stand-in), so transformers is told that
  torchvision is absent; SamModel does not use it."""
  import transformers.utils.import_utils as iu
  if not getattr(iu, "_fusionsam_no_torchvision", False):
    orig = iu._is_package_available

    def is_available(name, return_version=False):
      if name == "torchvision":
        return (False, "N/A")
      return orig(name, return_version)

    iu._is_package_available = is_available
    iu._fusionsam_no_torchvision = True
  from transformers import SamConfig, SamModel
  return SamConfig, SamModel


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  SamConfig, SamModel = _transformers_sam()
  t = SAM_PRESETS["tiny"]
  config = SamConfig(
      vision_config=dict(hidden_size=t.encoder_embed_dim, num_hidden_layers=t.encoder_depth,
                         num_attention_heads=t.encoder_num_heads,
                         global_attn_indexes=list(t.encoder_global_attn_indexes),
                         window_size=t.window_size, image_size=t.img_size,
                         output_channels=t.prompt_embed_dim, mlp_dim=4 * t.encoder_embed_dim,
                         num_pos_feats=t.prompt_embed_dim // 2),
      prompt_encoder_config=dict(hidden_size=t.prompt_embed_dim, image_size=t.img_size,
                                 mask_input_channels=t.mask_in_chans),
      # segment_anything's decoder LayerNorms use eps 1e-5 (transformers defaults to 1e-6):
      # set the official value so both compute the same function.
      mask_decoder_config=dict(hidden_size=t.prompt_embed_dim, num_attention_heads=t.decoder_num_heads,
                               mlp_dim=t.decoder_mlp_dim, iou_head_hidden_dim=t.iou_head_hidden_dim,
                               layer_norm_eps=1e-5))
  torch.manual_seed(0)
  model = SamModel(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # every parameter random (transformers initialises most to ~0)
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if "rel_pos" in name or "pos_embed" in name:
        p.copy_(0.3 * r)
      elif name.endswith(".bias"):
        p.copy_(0.1 * r)
      elif p.ndim == 1:
        p.copy_(1.0 + 0.2 * r)
      elif "positional_embedding" in name or p.shape[0] <= 4 and p.ndim == 2:
        p.copy_(r)
      else:
        p.copy_(r / np.sqrt(np.prod(p.shape[1:])))
  path = tmp_path_factory.mktemp("hf") / "sam-tiny"
  model.save_pretrained(path)
  return model, path


def test_loads_without_torch(hf):
  _, path = hf
  code = ("import sys; sys.modules['torch'] = None; "
          "from fusionsam_jax.models.sam.build import load_sam; "
          f"sam = load_sam({str(path)!r}); print(sam.config.encoder_depth)")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ref.REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "4"


def test_matches_transformers(hf):
  model, path = hf
  sam = load_sam(os.path.join(path, "model.safetensors"))
  assert sam.config == SAM_PRESETS["tiny"]
  s = sam.config.img_size
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(1, 3, s, s)).astype(np.float32)
  pts = rng.uniform(0, s, (1, 2, 3, 2)).astype(np.float32)  # 2 point sets of 3 points
  labels = np.array([[[1, 0, 1], [1, 1, 0]]], np.int64)
  boxes = np.sort(rng.uniform(0, s, (1, 2, 2, 2)), axis=2).reshape(1, 2, 4).astype(np.float32)
  module = Sam(sam.config)
  e4 = 4 * sam.config.image_embedding_size
  # One program for every prompt kind (the padded layout the predictor uses).
  decode = jax.jit(lambda p, e, *args, multi: module.apply(
      {"params": p}, e, *args, np.zeros((2, e4, e4, 1), np.float32), np.zeros(2, bool),
      multi, method=Sam.decode_padded), static_argnames="multi")
  with torch.no_grad():
    t_emb = model.get_image_embeddings(torch.as_tensor(pixels))
  with jax.default_matmul_precision("highest"):
    emb = jax.jit(lambda p, x: module.apply({"params": p}, x, method=Sam.encode))(
        sam.params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert ref.rel_err(np.asarray(emb).transpose(0, 3, 1, 2), t_emb.numpy()) < TOL
    cases = [dict(input_points=pts, input_labels=labels), dict(input_boxes=boxes),
             dict(input_points=pts, input_labels=labels, input_boxes=boxes)]
    for case in cases:
      for multi in (True, False):
        with torch.no_grad():
          out = model(image_embeddings=t_emb, multimask_output=multi,
                      **{k: torch.as_tensor(v) for k, v in case.items()})
        has_pts, has_box = "input_points" in case, "input_boxes" in case
        coords = np.zeros((2, 4, 2), np.float32)
        labs = np.full((2, 4), -1, np.int32)
        valid = np.zeros((2, 4), bool)
        if has_pts:
          coords[:, :3], labs[:, :3] = pts[0], labels[0]
          valid[:, :3 if has_box else 4] = True  # SAM's pad point when there is no box
        low, iou = decode(sam.params, emb, coords, labs, valid, boxes[0],
                          np.full(2, has_box), multi=multi)
        want_low = out.pred_masks[0].numpy()
        assert low.shape == want_low.shape
        assert ref.rel_err(low, want_low) < TOL
        assert ref.rel_err(iou, out.iou_scores[0].numpy()) < TOL


def test_registry(hf, tmp_path):
  _, path = hf
  assert set(sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b"}
  with pytest.raises(CheckpointError, match="vit_b"):
    build_sam_vit_b(checkpoint=str(path))
  with pytest.raises(CheckpointError, match="no such file"):
    sam_model_registry["vit_h"](checkpoint=str(tmp_path / "missing.safetensors"))
