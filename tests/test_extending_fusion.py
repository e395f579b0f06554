"""docs/extending.md "Add a fusion module", as a test: a toy fusion module declared here,
registered through `models.layout.register_fusion`, selected with
``--config.model.fusion=toy_mean_conv`` and trained one step per stage on the tiny config.
The roles give it, with no other change to the package: training in the fusion stage, the
bf16 cast of the fusion path and a place in the embedding-cache key.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from _cli_helpers import DEMO_TINY, NUM_SCENES
from fusionsam_jax.models import layout

TOY = "toy_mean_conv"
TOY_KEY = "toy_fusion"


class MeanConvFusion(nn.Module):
  """Toy fusion: a 1x1 conv of the modalities' mean latent, (B, h, w, d_c) -> same."""

  @nn.compact
  def __call__(self, latents):
    z = jnp.mean(jnp.stack(list(latents)), axis=0)                 # (B, h, w, d_c)
    return dict(fusion=nn.Conv(z.shape[-1], (1, 1), name="conv")(z))


layout.register_fusion(layout.FusionModule(TOY, TOY_KEY, lambda model: MeanConvFusion()))


def _config(data_dir, *overrides):
  """configs/demo.py:tiny as the train CLI parses it, with ``--config.model.fusion=`` the
  toy and `overrides` (ml_collections reads the overrides from sys.argv)."""
  from fusionsam_jax.config_lib import normalize_overrides
  argv = ["test", f"--config={DEMO_TINY}", f"--config.data_dir={data_dir}",
          f"--config.generate.num={NUM_SCENES}", f"--config.model.fusion={TOY}", *overrides]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(argv)
    return normalize_overrides(holder.value)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  from fusionsam_jax.models import factory
  cfg = _config(tmp_path_factory.mktemp("toy_fusion_data"))
  model = factory.build_model(cfg)
  return cfg, model, factory.init_params(cfg, model)


def test_toy_module_has_a_role(toy):
  cfg, model, params = toy
  lay = model.layout
  assert lay.fusion == TOY_KEY and TOY_KEY in params
  assert "fmp" not in params and "concat_fusion" not in params
  assert TOY_KEY in lay.fusion_path and TOY_KEY in lay.embedding_inputs
  with pytest.raises(ValueError, match="already"):   # a second module under its key
    layout.register_fusion(layout.FusionModule("other", TOY_KEY, lambda m: MeanConvFusion()))


def test_toy_module_is_cast_to_bf16(toy):
  """The fusion path in bf16 (``model.fusion_dtype``) runs the toy's 1x1 conv on bf16
  operands: its kernel is cast with the rest of the path."""
  from fusionsam_jax.models import functional as F
  cfg, model, params = toy
  bf16 = model.clone(fusion_dtype="bfloat16")
  images = {m: jnp.zeros((1, 96, 128, c), jnp.float32)
            for m, c in (("rgb", 3), ("thermal", 1))}
  jaxpr = jax.make_jaxpr(lambda p: F.frozen_fusion(bf16, p, images))(params).jaxpr
  kernel = params[TOY_KEY]["conv"]["kernel"].shape                 # (1, 1, d_c, d_c)

  def convs(jx):
    for eq in jx.eqns:
      if eq.primitive.name == "conv_general_dilated":
        yield eq
      for v in eq.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None:
            yield from convs(getattr(inner, "jaxpr", inner))

  toy_convs = [eq for eq in convs(jaxpr) if tuple(eq.invars[1].aval.shape) == kernel]
  assert toy_convs
  assert all(eq.invars[1].aval.dtype == jnp.bfloat16 for eq in toy_convs)
  cast = F.cast_fusion_path(bf16, params, jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast[TOY_KEY]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(cast["mask_decoder"]))


def test_toy_module_is_in_the_embedding_cache_key(toy):
  from fusionsam_jax.stages import embedding_cache as EC
  cfg, model, params = toy
  key = EC.cache_key(cfg, params, "data", "train")[0]
  changed = dict(params, **{TOY_KEY: jax.tree.map(lambda x: x + 0.5, params[TOY_KEY])})
  assert EC.cache_key(cfg, changed, "data", "train")[0] != key
  head = dict(params, mask_decoder=jax.tree.map(lambda x: x + 0.5, params["mask_decoder"]))
  assert EC.cache_key(cfg, head, "data", "train")[0] == key


def test_toy_module_trains_one_step_per_stage(tmp_path, monkeypatch):
  from fusionsam_jax import experiment
  from fusionsam_jax.stages import registry
  from fusionsam_jax.training import logging as TL
  cfg = _config(tmp_path / "data", *(f"--config.train.stages.{n}.num_steps=1"
                                     for n in registry.NAMES),
                "--config.eval.after_training=False", "--config.train.eval_every=1",
                "--config.train.image_every=1")
  images = {}
  write = TL.MetricWriter.write_images

  def record(self, step, imgs, split="train"):
    images[split] = sorted(imgs)
    return write(self, step, imgs, split)

  monkeypatch.setattr(TL.MetricWriter, "write_images", record)
  seen = {}

  def hook(name, step):
    def wrapped(state, frozen, batch):
      before = jax.device_get(state.params)          # the state is donated to the step
      state, metrics = step(state, frozen, batch)
      seen[name] = (before, jax.device_get(state.params))
      return state, metrics
    return wrapped

  result = experiment.train(cfg, str(tmp_path / "run"), progress=False, step_hook=hook)
  assert list(result.stages) == list(registry.NAMES)
  assert all(result.stages[n]["steps"] == 1 for n in registry.NAMES), result.stages
  before, after = seen["fusion"]
  assert set(after) == {TOY_KEY, "fused_decoder"}
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                      before[TOY_KEY], after[TOY_KEY])
  assert max(jax.tree.leaves(diff)) > 0, diff
  # The staged segmentation stage reads the toy's output through the embedding cache.
  assert TOY_KEY not in seen["segmentation"][1]
  # TensorBoard images: the tokenizer stage's own (reconstructions), the evaluator's tiles
  # for the others.
  assert images["tokenizer/train"] == ["rgb/input|reconstruction",
                                       "thermal/input|reconstruction"], images
  for n in ("fusion", "segmentation"):
    assert images[f"{n}/train"] and images[f"{n}/train"] == images["segmentation/train"]
    assert not any("reconstruction" in k for k in images[f"{n}/train"]), images
