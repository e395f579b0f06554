"""Eq. 7 on a SAM 2 backbone: the frozen Hiera trunk's first-stage blocks as Phi, against
Meta's `sam2` trunk on the same random weights (a real `.pt` through the converter CLI);
on for a SAM-2-backbone config with converted SAM 2 weights, off without them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
pytest.importorskip("hydra")

import sam2_reference as ref
from fusionsam_jax.models.sam2.checkpoint import load_sam2_checkpoint
from fusionsam_jax.models.sam_perceptual import Sam2PerceptualLoss

MEAN = np.array([0.485, 0.456, 0.406], np.float32)   # SAM 2's normalisation, written out
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def sam2_tiny(tmp_path_factory):
  tm, ckpt = ref.converted_random(tmp_path_factory.mktemp("sam2_perceptual"), "tiny", seed=11)
  return tm, ckpt


def test_features_match_official_hiera_blocks(sam2_tiny):
  """Phi(x) = `sam2`'s trunk.patch_embed + trunk._get_pos_embed(grid) + trunk.blocks[0] on a
  40 x 72 image normalised as SAM 2 does and zero-padded to 64 x 96 (16 x 24 tokens)."""
  tm, ckpt = sam2_tiny
  cfg, params = load_sam2_checkpoint(str(ckpt))
  loss = Sam2PerceptualLoss(cfg, params["image_encoder"]["trunk"], num_blocks=1)
  x = np.random.default_rng(0).uniform(0, 1, (2, 40, 72, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = loss.features(jnp.asarray(x))
  xt = np.zeros((2, 64, 96, 3), np.float32)
  xt[:, :40, :72] = (x - MEAN) / STD
  trunk = tm.image_encoder.trunk
  with torch.no_grad():
    h = trunk.patch_embed(torch.from_numpy(xt.transpose(0, 3, 1, 2)))   # (B, H, W, C)
    h = h + trunk._get_pos_embed(h.shape[1:3])
    want = trunk.blocks[0](h).numpy()
  assert len(got) == 1 and got[0].shape == want.shape == (2, 16, 24, cfg.embed_dim)
  err = float(np.abs(np.asarray(got[0]) - want).max() / np.abs(want).max())
  assert err < 1e-4, err


def test_distance_is_zero_on_equal_images_and_reaches_both_inputs(sam2_tiny):
  _, ckpt = sam2_tiny
  loss = Sam2PerceptualLoss.from_checkpoint(str(ckpt), num_blocks=2)
  assert loss.num_blocks == 1          # capped at the first stage (tiny: one block)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 1)), jnp.float32)   # thermal: 1 channel
  y = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 1)), jnp.float32)
  d = jax.jit(lambda a, b, l: l(a, b))(x, y, loss)
  assert d.shape == (2,) and bool(jnp.all(d > 0))
  np.testing.assert_allclose(np.asarray(loss(x, x)), 0.0, atol=1e-6)
  g = jax.grad(lambda a: jnp.sum(loss(a, y)))(x)
  assert float(jnp.abs(g).max()) > 0
  with pytest.raises(ValueError, match="num_blocks"):
    Sam2PerceptualLoss(loss.config, {}, num_blocks=2)
  with pytest.raises(ValueError, match="never runs on random"):
    Sam2PerceptualLoss(loss.config, None)


def test_on_for_a_sam2_backbone_config_off_without_its_weights(sam2_tiny, tmp_path, capsys):
  """configs/demo.py:tiny,sam2 (FusionSAM on the tiny SAM 2): with `model.sam2_checkpoint`
  the tokenizer stage's Eq. 7 uses SAM 2's Hiera, even when a SAM checkpoint is also named
  (SAM's ViT is not this run's encoder); without it the loss is off."""
  from _cli_helpers import tiny_config
  from fusionsam_jax.stages import tokenizer as tok_stage
  _, ckpt = sam2_tiny
  c = tiny_config(tmp_path / "data", "tiny,sam2")
  c.perceptual_weights = ""
  c.model.sam2_checkpoint = None
  c.model.sam_checkpoint = str(tmp_path / "not_this_runs_encoder")
  assert tok_stage.perceptual_loss(c, print) is None
  assert "OFF" in capsys.readouterr().out
  c.model.sam2_checkpoint = str(ckpt)
  loss = tok_stage.perceptual_loss(c, print)
  assert isinstance(loss, Sam2PerceptualLoss)
  assert "SAM 2 encoder" in capsys.readouterr().out
