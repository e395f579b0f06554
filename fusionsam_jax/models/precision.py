"""Mixed precision: compute in bf16 over float32 params (``model.train_dtype``,
``model.fusion_dtype``).

The params (and the optimizer state) stay float32; a loss function casts them to the
compute dtype on entry (`cast_floating`), so the gradients come back float32 through the
cast. What stays float32 whatever the compute dtype: the codebook and its usage average
(leaves named in `KEEP_FLOAT32`; the quantizer searches and looks codes up in float32,
`lstg.VectorQuantizer`), GroupNorm / LayerNorm statistics (Flax's float32 reductions, the
FMP's `layer_norm`), the attention softmax (`jax.nn.dot_product_attention` keeps its logits
float32) and the losses, which take float32 inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

#: The compute dtypes a training stage accepts (``model.train_dtype``).
TRAIN_DTYPES = ("float32", "bfloat16")
#: Param leaves (by name) that are never cast.
KEEP_FLOAT32 = ("codebook", "usage")


def check_train_dtype(name: str) -> jnp.dtype:
  """``jnp.dtype(name)``; raises ValueError unless `name` is one of `TRAIN_DTYPES`."""
  if str(name) not in TRAIN_DTYPES:
    raise ValueError(f"model.train_dtype {name!r}: expected one of {', '.join(TRAIN_DTYPES)}")
  return jnp.dtype(name)


def cast_floating(tree: Any, dtype, keep: tuple[str, ...] = KEEP_FLOAT32) -> Any:
  """`tree` with its floating leaves in `dtype`, except leaves whose name is in `keep`.
  A float32 `dtype` returns `tree` itself."""
  dt = jnp.dtype(dtype)
  if dt == jnp.float32:
    return tree

  def cast(path, x):
    name = getattr(path[-1], "key", None) if path else None
    if name in keep or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return x
    return jnp.asarray(x).astype(dt)

  return jax.tree_util.tree_map_with_path(cast, tree)
