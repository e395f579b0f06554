"""The train state pytree.

`TrainState` is a plain pytree (`flax.struct.dataclass`): the params a stage trains (only
those: frozen params are an argument of the step, `stages.common`), their optimizer state,
the step and the stage's PRNG key data.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


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
               opt_state=init_optimizer(optimizer, params), rng=jnp.asarray(rng, jnp.uint32))


def init_optimizer(optimizer: optax.GradientTransformation, params: PyTree) -> PyTree:
  """``optimizer.init(params)`` as one compiled program (op by op it compiled a few small
  programs per parameter shape at every start: the flattening, the zero moments)."""
  return jax.jit(optimizer.init)(params)


def count_params(params: PyTree, mask: PyTree | None = None) -> int:
  """Number of scalars in `params` (only where `mask` is True, if given). Leaves may be
  arrays or `jax.ShapeDtypeStruct`s."""
  leaves = jax.tree.leaves(params)
  keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  return sum(math.prod(np.shape(x)) for x, m in zip(leaves, keep) if m)


def learning_rate_at(learning_rate: float | optax.Schedule, step: int) -> float:
  """The learning rate used for update number `step` (0-based)."""
  if callable(learning_rate):
    return float(learning_rate(step))
  return float(learning_rate)


__all__: Iterable[str] = ("TrainState", "count_params", "learning_rate_at")
