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


class CompileClock:
  """Where a process's compilation time goes, from JAX's monitoring events (cumulative).

  ``snapshot()`` -> {"trace_s": jaxpr tracing, "lower_s": jaxpr -> MLIR, "backend_s": XLA
  compile or persistent-cache load, "cache_read_s": of that, reading and deserialising
  cached executables, "cache_hits", "cache_requests", "programs"}. Subtract two snapshots
  for the cost of what ran between them. One listener set per process, registered on first
  use; counting is cheap (a dict update per event).
  """

  _EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
             "/jax/core/compile/backend_compile_duration": "backend_s",
             "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s"}
  _COUNTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
             "/jax/compilation_cache/compile_requests_use_cache": "cache_requests"}
  _totals: dict = {}
  _registered = False

  def __init__(self):
    cls = type(self)
    if not cls._registered:
      cls._totals.update({k: 0.0 for k in (*cls._EVENTS.values(), *cls._COUNTS.values(),
                                            "programs")})

      def on_duration(event, secs, **_):
        key = cls._EVENTS.get(event)
        if key is not None:
          cls._totals[key] += secs
          if key == "backend_s":
            cls._totals["programs"] += 1

      def on_event(event, **_):
        key = cls._COUNTS.get(event)
        if key is not None:
          cls._totals[key] += 1

      jax.monitoring.register_event_duration_secs_listener(on_duration)
      jax.monitoring.register_event_listener(on_event)
      cls._registered = True

  def snapshot(self) -> dict:
    return dict(type(self)._totals)

  @staticmethod
  def since(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}
