"""The `Stage` spec, the param partition and the jitted train steps every stage uses.

A stage trains a subset of the model's params (``Stage.trainable``, '/'-separated paths).
Its `TrainState` holds only that subset and its optimizer state; the frozen params it reads
(``Stage.reads``) are an argument of the step, never donated and never checkpointed (as
big_vision's UViM trainer passes ``task_params``). The CLI (`experiment.train`) and the step
benchmark (`benchmarks/train_step.py`) both run `Stage.train_step` on `Stage.iterator`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from fusionsam_jax.training import mesh as mesh_lib
from fusionsam_jax.training.state import TrainState

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A training stage, declared once (`stages.registry.REGISTRY`, in training order).

  name: the stage's name (``config.train.stages.<name>``, ``checkpoints/<name>``, metrics
  ``<name>/...``); make(ctx) -> `Stage` or None (nothing to train), with ``ctx.stage`` this
  spec; rng_offset: the stage's PRNG key is ``PRNGKey(seed * 1000 + rng_offset)`` and its
  training iterator shuffles with ``seed + rng_offset``.
  """
  name: str
  make: Callable[["Context"], "Stage | None"]
  rng_offset: int

  def build(self, ctx: "Context") -> "Stage | None":
    """The stage for `ctx` (None: nothing to train)."""
    return self.make(dataclasses.replace(ctx, stage=self))


@dataclasses.dataclass
class Context:
  """What building a stage needs. `spec`: the data (`data.spec.DataSpec`); `train_size`:
  examples in its train split (durations in epochs become steps with it).

  Options every stage's ``make(ctx)`` may read: `evaluator` (an
  `evaluators.segmentation.Evaluator` validating the stage, or None: no validation);
  `perceptual` (build the Eq. 7 feature network; False when only restoring params);
  `use_cache` (the embedding cache: None, the config decides). `stage`: the `StageSpec`
  being built (set by `StageSpec.build`)."""
  config: Any
  model: Any
  mesh: jax.sharding.Mesh
  spec: Any
  train_size: int
  workdir: str | None = None
  say: Callable[[str], None] = print
  progress: bool = True
  evaluator: Any = None
  perceptual: bool = True
  use_cache: bool | None = None
  stage: StageSpec | None = None

  def stage_spec(self) -> StageSpec:
    """`stage`; raises ValueError when the context was not made by `StageSpec.build`."""
    if self.stage is None:
      raise ValueError("a stage is built through its StageSpec: stages.registry.build(ctx, "
                       "name) or spec.build(ctx)")
    return self.stage


@dataclasses.dataclass
class Stage:
  """One training stage.

  trainable: '/'-paths of the model params it trains; reads: top-level model params its
    step reads besides them (passed in frozen); init_state(trainable params) -> TrainState
    (deterministic: seeded from the config); train_step(state, frozen, batch) ->
    (state, metrics), jitted over the mesh, state donated; model_params(state) -> the
    trained model params in a state (a subtree of the model's tree); iterator(params) ->
    the endless host batch iterator (params: the full model params, e.g. for the embedding
    cache); eval_fn(params) -> metrics (val), or None; best_k: checkpoints kept by
    ``val_miou``; images(first val batch) -> fn(model params) -> {tag: (N, H, W, 3)}:
    the stage's TensorBoard images (None: the evaluator's fused image / prediction tiles).
  """
  name: str
  num_steps: int
  batch_size: int
  lr: float | optax.Schedule
  trainable: tuple[str, ...]
  reads: tuple[str, ...]
  init_state: Callable[[PyTree], TrainState]
  train_step: Callable
  iterator: Callable[[PyTree], Iterator]
  model_params: Callable[[TrainState], PyTree] = lambda state: state.params
  eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None
  eval_every: int = 0
  best_k: int = 0
  notes: tuple[str, ...] = ()
  images: Callable[[Mapping], Callable[[PyTree], Mapping]] | None = None

  def frozen(self, params: PyTree) -> PyTree:
    """The frozen params the step reads: ``reads`` minus what the stage trains."""
    return drop(select(params, self.reads), self.trainable)

  def abstract_state(self, params: PyTree) -> PyTree:
    """The state's shapes (a checkpoint template) from (possibly abstract) model params."""
    return jax.eval_shape(self.init_state, select(params, self.trainable))


# -- the param partition ------------------------------------------------------------------------


def _parts(path: str) -> tuple[str, ...]:
  return tuple(p for p in path.strip("/").split("/") if p)


def select(params: Mapping, paths: Sequence[str]) -> dict:
  """The subtrees of `params` at `paths` ('/'-separated), as a nested dict with the same
  keys above them. Raises KeyError naming a path that is not in the tree."""
  out: dict = {}
  for path in paths:
    parts = _parts(path)
    node, dst = params, out
    for i, p in enumerate(parts):
      if not isinstance(node, Mapping) or p not in node:
        raise KeyError(f"param path {path!r} not in the model's params (at {p!r}; keys there:"
                       f" {sorted(node) if isinstance(node, Mapping) else 'a leaf'})")
      node = node[p]
      if i == len(parts) - 1:
        dst[p] = node
      else:
        dst = dst.setdefault(p, {})
  return out


def drop(params: Mapping, paths: Sequence[str]) -> dict:
  """`params` without the subtrees at `paths` (absent paths are ignored)."""
  by_head: dict[str, list] = {}
  gone = set()
  for path in paths:
    parts = _parts(path)
    if len(parts) == 1:
      gone.add(parts[0])
    else:
      by_head.setdefault(parts[0], []).append("/".join(parts[1:]))
  out = {}
  for k, v in params.items():
    if k in gone:
      continue
    if k in by_head and isinstance(v, Mapping):
      sub = drop(v, by_head[k])
      if sub:
        out[k] = sub
    else:
      out[k] = v
  return out


def merge(*trees: Mapping) -> dict:
  """Recursive union of nested dicts; later trees win on the same leaf."""
  out: dict = {}
  for t in trees:
    for k, v in t.items():
      if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
        out[k] = merge(out[k], v)
      else:
        out[k] = dict(v) if isinstance(v, Mapping) else v
  return out


def top_level(paths: Sequence[str]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(_parts(p)[0] for p in paths))


# -- optimizer and steps -------------------------------------------------------------------------


def make_optimizer(lr: float | optax.Schedule, weight_decay: float, *,
                   clip: float | None = None, flatten: bool = True
                   ) -> optax.GradientTransformation:
  """Adam with the L2 weight decay of ``torch.optim.Adam(weight_decay=...)`` (the paper's
  "Adam, lr 1e-4, weight decay 1e-3"), optionally after global-norm clipping. `flatten`:
  the state lives on one concatenated vector (`optax.flatten`; these transformations are
  elementwise), so a step moves a few arrays instead of a few per leaf."""
  parts = []
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if weight_decay:
    parts.append(optax.add_decayed_weights(float(weight_decay)))
  parts += [optax.scale_by_adam(),
            optax.scale_by_learning_rate(lr if callable(lr) else float(lr))]
  tx = optax.chain(*parts)
  return optax.flatten(tx) if flatten else tx


def new_state(params: PyTree, tx: optax.GradientTransformation, seed_key) -> TrainState:
  return TrainState.create(params, tx, seed_key)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh):
  """``(state, frozen, batch) -> (state, metrics)``, jitted: state and frozen params
  replicated, batch sharded on ``data``, the state donated.

  ``loss_fn(params, batch, rng, step) -> (loss, aux)`` sees the merged model params
  (frozen + trained); gradients are taken for the trained ones only. `rng` is
  ``fold_in(state.rng, state.step)``, so a resumed run draws the same keys. Metrics: the
  aux terms, ``loss`` and ``grad_norm``.
  """
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)

  def step_fn(state: TrainState, frozen: PyTree, batch: PyTree):
    rng = jax.random.fold_in(state.rng, state.step)

    def f(p):
      return loss_fn(merge(frozen, p), batch, rng, state.step)

    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**dict(aux), "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step_fn, in_shardings=(repl, repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def make_gan_train_step(g_loss_fn: Callable, d_loss_fn: Callable,
                        g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation,
                        mesh: jax.sharding.Mesh, *, post_update: Callable | None = None):
  """A VQGAN-style step over ``state.params = {"generator", "discriminator"}`` with
  ``state.opt_state = {"g", "d"}``: ``g_loss_fn(g_params, d_params, batch, rng, step) ->
  (loss, (aux, carry))`` with the discriminator held fixed, then ``d_loss_fn(d_params,
  carry, batch, rng, step) -> (loss, aux)`` on the stop-gradient `carry` (the
  reconstructions); both see the params from before the step. Same signature, shardings
  and donation as `make_train_step`; metrics add ``d_loss``, ``d/<aux>``, ``d_grad_norm``.
  ``post_update(g_params, batch, rng) -> (g_params, aux)``, if given, runs on the updated
  generator params inside the step (the tokenizers' dead-code restarts).
  """
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)

  def step_fn(state: TrainState, frozen: PyTree, batch: PyTree):
    g_rng, d_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    gp, dp = state.params["generator"], state.params["discriminator"]

    def gf(g):
      return g_loss_fn(merge(frozen, g), dp, batch, g_rng, state.step)

    (g_loss, (g_aux, carry)), g_grads = jax.value_and_grad(gf, has_aux=True)(gp)
    carry = jax.lax.stop_gradient(carry)
    (d_loss, d_aux), d_grads = jax.value_and_grad(
        lambda d: d_loss_fn(d, carry, batch, d_rng, state.step), has_aux=True)(dp)
    g_upd, g_os = g_tx.update(g_grads, state.opt_state["g"], gp)
    d_upd, d_os = d_tx.update(d_grads, state.opt_state["d"], dp)
    params = {"generator": optax.apply_updates(gp, g_upd),
              "discriminator": optax.apply_updates(dp, d_upd)}
    post_aux = {}
    if post_update is not None:
      params["generator"], post_aux = post_update(
          params["generator"], batch, jax.random.fold_in(g_rng, 1))
    metrics = {**dict(g_aux), **dict(post_aux), "loss": g_loss, "grad_norm": optax.tree.norm(g_grads),
               **{f"d/{k}": v for k, v in dict(d_aux).items()}, "d_loss": d_loss,
               "d_grad_norm": optax.tree.norm(d_grads)}
    return state.replace(step=state.step + 1, params=params,
                         opt_state={"g": g_os, "d": d_os}), metrics

  return jax.jit(step_fn, in_shardings=(repl, repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def stage_key(config, stage: StageSpec) -> jax.Array:
  """The stage's PRNG key (seed-derived; the step folds in the step number)."""
  return jax.random.PRNGKey(int(config.seed) * 1000 + int(stage.rng_offset))


LR_SCHEDULES = ("constant", "cosine")


def stage_lr(config, stage: str, num_steps: int) -> float | optax.Schedule:
  """The stage's learning rate: ``lr`` (``lr_schedule`` "constant", the paper's), or
  "cosine": from ``lr`` to 0 over the stage's `num_steps` (SGDR's annealing without
  restarts, Loshchilov & Hutter 2017)."""
  sc = config.train.stages[stage]
  kind = sc.get("lr_schedule", "constant")
  if kind == "constant":
    return float(sc.lr)
  if kind == "cosine":
    return optax.cosine_decay_schedule(float(sc.lr), max(1, int(num_steps)))
  raise ValueError(f"train.stages.{stage}.lr_schedule is {kind!r}; expected one of "
                   f"{', '.join(LR_SCHEDULES)}")


def describe_lr(lr: float | optax.Schedule) -> str:
  """``0.002`` or ``0.002 -> 0 (cosine)`` for a stage's header line."""
  if callable(lr):
    return f"{float(lr(0)):g} -> 0 (cosine)"
  return f"{lr:g}"


def stage_optimizer(config, stage: str, lr) -> optax.GradientTransformation:
  """The stage's Adam with learning rate ``lr`` (a float or schedule, e.g. `stage_lr`)."""
  sc = config.train.stages[stage]
  return make_optimizer(lr, float(sc.weight_decay),
                        clip=float(config.train.get("grad_clip", 0.0) or 0.0) or None)


def with_float32(batch: Mapping[str, Any], keys=("image_embeddings", "fusion")) -> dict:
  """Cached (possibly float16) embeddings / fusion latents as float32."""
  return dict(batch, **{k: jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32),
                                        batch[k]) for k in keys if k in batch})
