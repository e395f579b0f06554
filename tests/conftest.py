"""Test-session setup: one persistent JAX compilation cache for the test process and every
CLI subprocess it starts (the same tiny models are compiled by many tests), shared by the
pytest-xdist workers."""

import os

# XLA's CPU backend at LLVM -O0 without its expensive passes, for this process and (through
# XLA_FLAGS) every CLI subprocess: on a clean clone the suite is mostly compiling small models,
# and these compile ~12% faster (a CLI end-to-end test: 80 -> 70 s, cold cache). The HLO
# passes are unchanged, but LLVM's are not (e.g. no multiply-add contraction), so results can
# differ from an optimised build in the last bits: a test comparing bitwise with a subprocess
# must pass these flags on (test_training_parallel does).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true"]))

import jax  # noqa: E402

from fusionsam_jax.cli.driver import backfill_cache_atimes

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      ".pytest_jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
# A size limit turns on the cache's eviction and with it its file lock: the suite runs on
# two pytest workers (and CLI subprocesses), which would otherwise race on an entry's write.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
backfill_cache_atimes(os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
