"""bf16 training compute (``model.train_dtype="bfloat16"``) against the float32 path at
HIGHEST matmul precision (the truth): per stage, the loss, its smooth terms and the gradient
of everything the stage trains, on the paper config's model at tiny widths with fixed params
and inputs. Also checks that the bf16 path really convolves in bf16 while the gradients stay
float32.

Measured on the 2-core CPU (bf16 / params-rounded-to-bf16 reference): tokenizer loss 6.8e-2
(3.1e-2; the adaptive weight of Eq. 8, a ratio of gradient norms, moves most), gradient
0.30 (0.26), cosine 0.960; fusion loss 6.3e-4 (1.6e-3), gradient 0.20 (0.11), cosine 0.983;
joint segmentation loss 5.4e-4 (1.3e-3), gradient 0.29 (0.12), cosine 0.964. The smooth
terms (reconstruction, Eq. 6, SSIM / intensity / gradient, CE, Dice) agree within 1e-2."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mfnet
from fusionsam_jax.models.fusionsam import CHANNELS, build_model, init_discriminators, init_params
from fusionsam_jax.stages import common as C
from fusionsam_jax.stages import fusion as fusion_stage
from fusionsam_jax.stages import segmentation as seg_stage
from fusionsam_jax.stages import tokenizer as tok_stage

HW = (32, 48)


@pytest.fixture(scope="module")
def setup():
  cfg = mfnet.get_config("tiny")
  assert cfg.model.train_dtype == "float32"
  models = {"float32": build_model(cfg.model)}
  cfg.model.train_dtype = "bfloat16"
  models["bfloat16"] = build_model(cfg.model)
  assert models["bfloat16"].train_dtype == "bfloat16"
  params = init_params(models["float32"], jax.random.PRNGKey(0), HW)
  rng = np.random.default_rng(0)
  # Smooth random scenes (random pixels are no image a tokenizer would see): bilinear
  # upsampling of coarse noise, plus a little pixel noise.
  batch = {}
  for m in cfg.model.modalities:
    coarse = rng.uniform(0, 255, (2, HW[0] // 8, HW[1] // 8, CHANNELS[m]))
    img = np.asarray(jax.image.resize(coarse, (2,) + HW + (CHANNELS[m],), "linear"))
    img = img + rng.normal(0, 8, img.shape)
    batch[m] = np.clip(np.round(img), 0, 255).astype(np.uint8)
  batch["label"] = rng.integers(0, cfg.model.num_classes, (2,) + HW).astype(np.int32)
  batch["label"][:, :3] = 255
  return cfg, models, params, batch


def _rel(a, b) -> float:
  """||a - b|| / ||b|| over all leaves (float64)."""
  la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
  lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
  num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb)))
  den = np.sqrt(sum(np.sum(y ** 2) for y in lb))
  return float(num / den)


def _convs(fn, *args) -> collections.Counter:
  """Operand dtypes of every convolution in `fn`'s jaxpr (sub-jaxprs included)."""
  out = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out[str(eqn.invars[0].aval.dtype)] += 1
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def _round_bf16(tree):
  """float32 leaves rounded to the nearest bf16 value (kept float32)."""
  return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
                      if jnp.asarray(x).dtype == jnp.float32 else x, tree)


def _compare(value_and_grads, args, *, loss_tol, terms_tol=2e-2, grad_factor=3.0,
             grad_floor=0.02):
  """`value_and_grads[dtype](*args) -> (loss, terms, grads)` for both dtypes. Truth: float32
  at HIGHEST. The bf16 loss must be within `loss_tol` (relative) of it, each of its `terms`
  (the smooth loss terms: reconstruction, Eq. 6, fusion, CE / Dice) within `terms_tol`. The
  gradient's conditioning is measured, not assumed: at a random init a stage's gradient moves
  a lot under any bf16-sized change (discrete code / point choices, L1 and Sobel signs, norm
  backward cancellation), so the reference is the float32 gradient at the params rounded
  to bf16. The bf16 gradient's relative error must stay within
  ``grad_factor x`` that reference + `grad_floor`. Returns the conv operand dtypes."""
  f32 = jax.jit(value_and_grads["float32"])
  with jax.default_matmul_precision("highest"):
    l32, t32, g32 = f32(*args)
    lr, _, gr = f32(*_round_bf16(args))
  l16, t16, g16 = jax.jit(value_and_grads["bfloat16"])(*args)
  for k in t32:
    rel = abs(float(t16[k]) - float(t32[k])) / abs(float(t32[k]))
    assert rel < terms_tol, (k, float(t16[k]), float(t32[k]), rel)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))   # float32 params
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g32))
  rel_loss = abs(float(l16) - float(l32)) / abs(float(l32))
  err, ref = _rel(g16, g32), _rel(gr, g32)
  ref_loss = abs(float(lr) - float(l32)) / abs(float(l32))
  print(f"loss rel {rel_loss:.5f} (params rounded: {ref_loss:.5f}); grad rel {err:.4f} "
        f"(params rounded: {ref:.4f}); cos {_cos(g16, g32):.4f}")
  assert rel_loss < loss_tol, (float(l16), float(l32), rel_loss)
  assert err < grad_factor * ref + grad_floor, (err, ref)
  # The bf16 path convolves in bf16; the float32 path never does.
  c16 = _convs(value_and_grads["bfloat16"], *args)
  c32 = _convs(value_and_grads["float32"], *args)
  assert "bfloat16" not in c32
  return c16, c32


def _cos(a, b) -> float:
  la = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
  lb = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
  return float(la @ lb / np.linalg.norm(la) / np.linalg.norm(lb))


def test_tokenizer_stage_bf16(setup):
  cfg, models, params, batch = setup
  sc = cfg.train.stages.tokenizer
  names = tok_stage.trainable(cfg.model)
  g = C.select(params, names)
  d = init_discriminators(cfg.model, jax.random.PRNGKey(3), HW)
  step = jnp.asarray(5, jnp.int32)   # past disc_start: adversarial term + adaptive weight on

  def make(dtype):
    g_loss, d_loss = tok_stage.losses_fn(models[dtype], cfg.model, sc, start=0)

    def fn(g, d, batch):
      (lg, (aux, carry)), gg = jax.value_and_grad(g_loss, has_aux=True)(
          g, d, batch, None, step)
      (ld, daux), gd = jax.value_and_grad(d_loss, has_aux=True)(
          d, jax.lax.stop_gradient(carry), batch, None, step)
      grads = {n: gg[n] for n in names}
      grads["discriminator"] = gd
      terms = {k: v for k, v in {**aux, **daux}.items()
               if k.endswith(("/rec", "/codebook", "/commitment", "/d_hinge"))}
      return lg + ld, terms, grads
    return fn

  c16, c32 = _compare({k: make(k) for k in models}, (g, d, batch), loss_tol=0.15)
  # Tokenizers and discriminators hold every convolution of this stage.
  assert set(c16) == {"bfloat16"} and sum(c16.values()) == sum(c32.values()), (c16, c32)


def test_fusion_stage_bf16(setup):
  cfg, models, params, batch = setup
  names = fusion_stage.trainable(cfg.model)
  frozen = C.drop(params, names)

  def make(dtype):
    loss = fusion_stage.loss_fn(models[dtype], cfg.model, cfg.train.stages.fusion)

    def fn(p, frozen, batch):
      (l, terms), gr = jax.value_and_grad(loss, has_aux=True)(
          C.merge(frozen, p), batch, None, 0)
      return l, {k: terms[k] for k in ("ssim", "intensity", "gradient")}, \
          {n: gr[n] for n in names}
    return fn

  c16, c32 = _compare({k: make(k) for k in models}, (C.select(params, names), frozen, batch),
                      loss_tol=1e-2)
  # The fusion loss's own filters (SSIM, Sobel) stay float32; the model's are bf16.
  assert c16["bfloat16"] > c16["float32"], c16


@pytest.mark.extended   # ~4 min on the 2-core CPU (the tiny SAM encoder in the joint step)
def test_segmentation_stage_joint_bf16(setup):
  cfg, models, params, batch = setup
  assert seg_stage.joint(cfg.model)           # Eq. 1, the paper configs' default
  names = seg_stage.trainable(cfg.model)
  tops = C.top_level(names)
  frozen = C.drop(params, names)

  def make(dtype):
    loss = seg_stage.loss_fn(models[dtype], cfg.model, cfg.train.stages.segmentation,
                             cfg.train.stages.fusion)

    def fn(p, frozen, batch):
      (l, aux), gr = jax.value_and_grad(loss, has_aux=True)(
          C.merge(frozen, p), batch, jax.random.PRNGKey(0), 0)
      return l, {k: aux[k] for k in ("ce", "dice", "f_f", "vq")}, {t: gr[t] for t in tops}
    return fn

  c16, c32 = _compare({k: make(k) for k in models}, (C.select(params, names), frozen, batch),
                      loss_tol=1e-2)
  assert c16["bfloat16"] > 0, c16
