"""Small JAX helpers shared by the model and the training code."""

from typing import Callable

import jax
import numpy as np


def _host_cpu():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # no CPU backend
    return None


def run_once(fn: Callable, *args):
  """``jax.jit(fn)(*args)`` for functions that run once (param init).

  Such functions are compiled for the host CPU with XLA's backend optimisations turned
  down, and their results moved to the default device (uncommitted). Compiling a one-off
  init for a GPU costs minutes for a model of FusionSAM's size (every initializer becomes
  its own kernel: ~2 min for ViT-H on an H100); on the CPU the same init compiles in seconds,
  and the optimisation passes cost more than they save for a single run (FusionSAM's init:
  ~16 s instead of ~35 s on 2 cores). Inside a trace (``jax.eval_shape``) it is plain jit.
  """
  jitted = jax.jit(fn)
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
    return jitted(*args)
  cpu = _host_cpu()
  if cpu is None:
    return jitted(*args)
  on_cpu = jax.devices()[0].platform == "cpu"
  with jax.default_device(cpu):
    args = jax.device_put(args, cpu)
    out = jitted.lower(*args).compile({"xla_backend_optimization_level": 0})(*args)
  if on_cpu:
    return out
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x)), out)
