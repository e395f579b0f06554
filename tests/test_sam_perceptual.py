"""Eq. 7 without VGG16: the frozen SAM encoder's early blocks as Phi, against the official
segment_anything modules on the same weights; on for a config with converted SAM weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusionsam_jax.models.sam.sam import SAM_PRESETS
from fusionsam_jax.models.sam_perceptual import SamPerceptualLoss, sam_input
from fusionsam_jax.models.sam.checkpoint import convert_state_dict, save_sam_checkpoint
import sam_reference as ref


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
  cfg = SAM_PRESETS["tiny"]
  tsam = ref.build_torch_sam(cfg, seed=5)
  conv_cfg, params = convert_state_dict({k: v.numpy() for k, v in tsam.state_dict().items()})
  ckpt = tmp_path_factory.mktemp("sam") / "ckpt"
  save_sam_checkpoint(str(ckpt), conv_cfg, params)
  return cfg, tsam, params, ckpt


def test_features_match_official_blocks(sam):
  """Phi(x) = official patch_embed + pos_embed[:h, :w] + blocks[0] on a 40 x 72 image
  (3 x 5 tokens after padding to 48 x 80, windows of 4 padded inside the block)."""
  cfg, tsam, params, _ = sam
  rng = np.random.default_rng(0)
  x = rng.random((2, 40, 72, 1)).astype(np.float32)
  loss = SamPerceptualLoss(cfg, params["image_encoder"], num_blocks=1)
  with jax.default_matmul_precision("highest"):
    got = loss.features(jnp.asarray(x))[0]
  # The reference: SAM's own normalisation written out, then the official modules.
  rgb = np.repeat(x, 3, -1) * 255.0
  norm = (rgb - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  norm = np.pad(norm, ((0, 0), (0, 8), (0, 8), (0, 0))).astype(np.float32)
  enc = tsam.image_encoder
  with torch.no_grad():
    t = enc.patch_embed(torch.from_numpy(norm.transpose(0, 3, 1, 2)))     # (B, h, w, C)
    t = t + enc.pos_embed[:, :t.shape[1], :t.shape[2]]
    want = enc.blocks[0](t).numpy()
  assert got.shape == want.shape == (2, 3, 5, cfg.encoder_embed_dim)
  assert ref.rel_err(got, want) < 1e-4
  np.testing.assert_allclose(sam_input(jnp.asarray(x), 16), norm, atol=1e-5)


def test_distance_and_gradient(sam):
  cfg, _, params, _ = sam
  loss = SamPerceptualLoss(cfg, params["image_encoder"], num_blocks=1)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((2, 32, 48, 3)), jnp.float32)
  y = jnp.clip(x + 0.2 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), 0, 1)
  with jax.default_matmul_precision("highest"):
    d_same, d = jax.jit(loss)(x, x), jax.jit(loss)(x, y)
    g = jax.grad(lambda a: jnp.mean(loss(x, a)))(y)
  assert np.allclose(d_same, 0.0, atol=1e-6) and (np.asarray(d) > 1e-3).all()
  assert float(jnp.abs(g).max()) > 0
  with pytest.raises(ValueError, match="num_blocks"):
    SamPerceptualLoss(cfg, params["image_encoder"], num_blocks=2).features(x)
  with pytest.raises(ValueError, match="never runs on random"):
    SamPerceptualLoss(cfg, None)


def test_on_for_a_config_with_converted_sam_weights(sam, capsys):
  from configs import mfnet
  from fusionsam_jax.stages import tokenizer as tok_stage
  _, _, _, ckpt = sam
  c = mfnet.get_config("tiny")            # a random SAM: the loss is off, as before
  assert tok_stage.perceptual_loss(c, print) is None
  assert "OFF" in capsys.readouterr().out
  c.model.sam_checkpoint = str(ckpt)
  c.perceptual_sam_blocks = 1
  loss = tok_stage.perceptual_loss(c, print)
  assert isinstance(loss, SamPerceptualLoss) and loss.num_blocks == 1
  assert "SAM encoder" in capsys.readouterr().out
