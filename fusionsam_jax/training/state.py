"""Train state pytree, trainable masks and the optimizer.

`TrainState` is a plain pytree (`flax.struct.dataclass`): `params` is the whole model param
tree, including frozen parts; a *trainable mask* (bool pytree over `params`) selects what a
stage updates. The optimizer built by `make_optimizer` keeps Adam moments only for trainable
leaves, as one concatenated vector (`only_trainable`); frozen leaves get zero updates.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
TrainableSpec = Union[None, str, Sequence[str], PyTree, Callable[[tuple, Any], bool]]

TRAIN = "train"
FREEZE = "freeze"


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar, number of completed updates; rng: raw uint32 PRNG key data."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array

  @classmethod
  def create(cls, params: PyTree, optimizer: optax.GradientTransformation,
             rng: jax.Array | int, step: int = 0) -> "TrainState":
    """Builds a state with a fresh optimizer state. `rng`: a key or an int seed."""
    if isinstance(rng, int):
      rng = jax.random.PRNGKey(rng)
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(step=jnp.asarray(step, jnp.int32), params=params,
               opt_state=optimizer.init(params), rng=jnp.asarray(rng, jnp.uint32))


def _path_names(path: tuple) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def trainable_mask(params: PyTree, trainable: TrainableSpec) -> PyTree:
  """A bool pytree over `params`: True where the leaf is trained.

  `trainable` may be
    * None: everything is trainable;
    * a string or a sequence of strings: subtrees named by ``/``-separated key paths from
      the root (``"fmp"``, ``"params/mask_decoder"``); every name must exist;
    * a callable ``(path_names: tuple[str, ...], leaf) -> bool``;
    * a bool pytree with the structure of `params` (or a prefix of it).
  """
  if trainable is None:
    return jax.tree.map(lambda _: True, params)
  if callable(trainable) and not isinstance(trainable, (str, bool)):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(trainable(_path_names(p), x)), params)
  if isinstance(trainable, str) or (
      isinstance(trainable, (list, tuple)) and all(isinstance(t, str) for t in trainable)):
    names = [trainable] if isinstance(trainable, str) else list(trainable)
    prefixes = [tuple(n.strip("/").split("/")) for n in names]
    found = set()
    all_paths = [_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pre in prefixes:
      if any(p[:len(pre)] == pre for p in all_paths):
        found.add(pre)
    missing = [("/".join(p)) for p in prefixes if p not in found]
    if missing:
      top = sorted({p[0] for p in all_paths if p})
      raise ValueError(f"trainable subtree(s) {missing} not found in params; "
                       f"top-level keys are {top}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(_path_names(p)[:len(pre)] == pre for pre in prefixes), params)
  # A bool pytree (possibly a prefix of params).
  return jax.tree.map(lambda t, sub: jax.tree.map(lambda _: bool(t), sub), trainable, params)


def count_params(params: PyTree, mask: PyTree | None = None) -> int:
  """Number of scalars in `params` (only where `mask` is True, if given). Leaves may be
  arrays or `jax.ShapeDtypeStruct`s."""
  leaves = jax.tree.leaves(params)
  keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  return sum(math.prod(np.shape(x)) for x, m in zip(leaves, keep) if m)


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-4,
    weight_decay: float = 1e-3,
    trainable: PyTree | None = None,
    *,
    clip: float | None = None,
    decoupled_weight_decay: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Adam with weight decay, updating only the `trainable` leaves.

  Weight decay defaults to the L2 form of `torch.optim.Adam(weight_decay=...)`, which is
  what the paper ("Adam, lr 1e-4, weight decay 1e-3") and the official code use: the decay
  term ``wd * param`` is added to the gradient before the Adam moments. Set
  `decoupled_weight_decay=True` for AdamW (``optax.adamw``-style, decay applied after the
  Adam scaling, multiplied by the learning rate).

  Args:
    learning_rate: a float or an optax schedule (step -> lr); the schedule's step counts
      this optimizer's updates.
    weight_decay: decay coefficient (0 disables it).
    trainable: a bool mask pytree over params (see `trainable_mask`); None trains all.
      Frozen leaves get zero updates and no optimizer state: the state holds the trainable
      leaves only, concatenated into one vector (`only_trainable`).
    clip: if set, clip the global norm of the (trainable) gradients to this value first.
  """
  parts = []
  if clip is not None:
    parts.append(optax.clip_by_global_norm(clip))
  if decoupled_weight_decay:
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
  else:
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  # Adam, L2 decay and global-norm clipping are elementwise (up to the global norm), so
  # their state can live on one concatenated vector (`ravel`): fewer arrays per step.
  return only_trainable(tx, trainable, ravel=True)


def only_trainable(inner: optax.GradientTransformation, mask: PyTree, *,
                   ravel: bool = False) -> optax.GradientTransformation:
  """`inner` applied to the leaves where the bool pytree `mask` is True, as one flat list.

  Frozen leaves get zero updates (None where the incoming update is None) and no state.
  Unlike ``optax.multi_transform`` / ``optax.masked``, whose states keep a placeholder node
  per frozen leaf (for the ViT-H tree, ~2 300 Python objects built and walked on every step,
  which made the host, not the GPU, the bottleneck of small steps), the state here is the
  inner state over the trainable leaves alone. `mask` may be a prefix of the params tree.

  ravel: concatenate the trainable leaves into one float32 vector for `inner`, so its state
  is a few arrays instead of a few per leaf (each array is host time per step, in and out
  of the jitted step). Only for elementwise optimizers and global-norm clipping (Adam,
  SGD, weight decay, `clip_by_global_norm`): they give the same updates on the vector.
  """
  treedef = jax.tree.structure(mask)
  keep = [bool(m) for m in treedef.flatten_up_to(mask)]

  def pick(tree):
    return [x for x, k in zip(treedef.flatten_up_to(tree), keep) if k]

  def flat(xs):
    if not ravel:
      return xs
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                            for x in jax.tree.leaves(xs)]) if xs else jnp.zeros((0,))

  def unflat(vec, like):
    if not ravel:
      return vec
    leaves, tdef = jax.tree.flatten(like)
    out, o = [], 0
    for x in leaves:
      n = math.prod(np.shape(x))
      out.append(vec[o:o + n].reshape(np.shape(x)).astype(x.dtype))
      o += n
    return jax.tree.unflatten(tdef, out)

  def init_fn(params):
    return inner.init(flat(pick(params)))

  def update_fn(updates, state, params=None):
    all_u = treedef.flatten_up_to(updates)
    u = [x for x, k in zip(all_u, keep) if k]
    new, state = inner.update(flat(u), state, None if params is None else flat(pick(params)))
    it = iter(unflat(new, u))
    out = [next(it) if k else jax.tree.map(jnp.zeros_like, x) for x, k in zip(all_u, keep)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_at(learning_rate: float | optax.Schedule, step: int) -> float:
  """The learning rate used for update number `step` (0-based)."""
  if callable(learning_rate):
    return float(learning_rate(step))
  return float(learning_rate)


def split_trainable(params: PyTree, mask: PyTree) -> tuple[list, list]:
  """(trainable leaves, frozen leaves) in flatten order; a small helper for tests."""
  leaves, m = jax.tree.leaves(params), jax.tree.leaves(mask)
  return ([x for x, t in zip(leaves, m) if t], [x for x, t in zip(leaves, m) if not t])


def opt_state_leaf_count(opt_state: PyTree) -> int:
  """Number of scalars held by an optimizer state."""
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(opt_state))


__all__: Iterable[str] = (
    "TrainState", "trainable_mask", "make_optimizer", "only_trainable", "learning_rate_at", "count_params",
    "split_trainable", "opt_state_leaf_count")
