"""First-run stumbles: "None" overrides, --help defaults, the predict overlay, cuDNN attention
on a machine without it."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(monkeypatch, *args):
  """--config parsed as a CLI does (ml_collections reads the overrides from sys.argv)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", *args]
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  fv(argv)
  return fv.config


def test_none_and_empty_overrides_mean_none(monkeypatch):
  from fusionsam_jax.config_lib import normalize_overrides
  mfnet = os.path.join(ROOT, "configs", "mfnet.py")
  raw = _parse(monkeypatch, f"--config={mfnet}", "--config.model.sam_checkpoint=None",
               "--config.perceptual_weights=")
  # ml_collections alone keeps the text (the stumble this fixes) ...
  assert raw.model.sam_checkpoint == "None" and raw.perceptual_weights == ""
  c = normalize_overrides(raw)
  assert c.model.sam_checkpoint is None and c.perceptual_weights is None
  # ... an empty value of a field that cannot be None stays text; other fields are untouched
  c = normalize_overrides(_parse(monkeypatch, f"--config={mfnet}:tiny",
                                 "--config.model.sam_checkpoint=",
                                 "--config.model.fused_color="))
  assert c.model.sam_checkpoint is None and c.model.fused_color == ""
  assert c.variant == "tiny" and c.model.attn_impl == "xla" and c.data_dir == "data_cache"


def test_model_overrides_validate(monkeypatch):
  from fusionsam_jax import config_lib
  c = _parse(monkeypatch, f"--config={os.path.join(ROOT, 'configs', 'mfnet.py')}")
  config_lib.override_model(c, attn_impl="xla", encoder_dtype="float32")
  assert (c.model.attn_impl, c.model.encoder_dtype) == ("xla", "float32")
  config_lib.override_model(c)                       # None: unchanged
  assert (c.model.attn_impl, c.model.encoder_dtype) == ("xla", "float32")
  with pytest.raises(ValueError, match="attn_impl"):
    config_lib.override_model(c, attn_impl="flash")
  with pytest.raises(ValueError, match="encoder_dtype"):
    config_lib.override_model(c, encoder_dtype="int8")


@pytest.mark.parametrize("module,expect", [
    ("fusionsam_jax.predict", ["(default: 'best')", "(default: 'strict')"]),
    ("fusionsam_jax.data.prepare", ["(default: 'strict')", "(default: 'error')"]),
    ("fusionsam_jax.metrics.miou", ["(default: '255')"]),
    ("fusionsam_jax.metrics.sod", ["(default: 'false')"]),
])
def test_help_shows_defaults_and_no_runpy_warning(module, expect):
  r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  text = " ".join(r.stdout.split())
  for e in expect:
    assert e in text, (module, e, r.stdout)
  assert "RuntimeWarning" not in r.stderr


def test_overlay_leaves_class_zero_unblended():
  from fusionsam_jax.data.datasets.mfnet import SPEC as MFNET
  from fusionsam_jax.inference import overlay
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
  pred = rng.integers(0, 9, (6, 7))
  pred[0, 0], pred[0, 1] = 0, 1
  out = overlay(base, pred, MFNET.palette)
  pal = np.asarray(MFNET.palette, np.float64)
  for y in range(6):
    for x in range(7):
      want = base[y, x] if pred[y, x] == 0 else np.round(0.5 * base[y, x] + 0.5 *
                                                         pal[pred[y, x]])
      np.testing.assert_array_equal(out[y, x], want)


def test_cudnn_attention_falls_back_to_xla_on_cpu():
  import jax
  from fusionsam_jax.models.sam import image_encoder as ie
  if ie.cudnn_available():
    pytest.skip("this machine has a GPU backend: no fallback to test")
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 32))
  for window in (0,):        # global attention: cuDNN would fold the rel-pos bias into q / k
    mods = {impl: ie.Attention(dim=32, num_heads=2, use_rel_pos=True,
                               input_size=(6, 6), window_size=window,
                               attn_impl=impl) for impl in ("xla", "cudnn")}
    params = jax.jit(mods["xla"].init)(jax.random.PRNGKey(1), x)
    # random rel-pos tables too (they are initialised to zeros)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
    want = jax.jit(mods["xla"].apply)(params, x)
    got = jax.jit(mods["cudnn"].apply)(params, x)
    assert np.all(np.isfinite(np.asarray(want)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
