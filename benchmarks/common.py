"""Shared helpers for the benchmarks: environment record and atomic JSON output."""

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile


def environment():
  env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "python": platform.python_version(), "command": " ".join([sys.executable] + sys.argv),
         "host": platform.node()}
  for mod in ("jax", "jaxlib", "flax", "torch", "numpy"):
    try:
      env[mod] = __import__(mod).__version__
    except Exception:  # not installed
      pass
  try:
    import jax
    env["jax_devices"] = [str(d.device_kind) for d in jax.devices()]
  except Exception:
    pass
  try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except Exception:
    pass
  return env


def write_json(path, obj):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def define_number_list(fv, name, default, help, kind=int, length=None, min_length=0):
  """An absl flag on `fv` holding a comma-separated list of `kind` (``--batches=1,4,8``):
  a value that is not a `kind`, or a list of the wrong length (`length` exact, else at least
  `min_length`), is a usage error naming the flag."""
  from absl import flags

  class NumberListParser(flags.ListParser):

    def __init__(self):
      super().__init__()
      self.syntactic_help = f"a comma separated list of {kind.__name__} values"

    def parse(self, argument):
      items = super().parse(argument)
      try:
        values = [kind(x) for x in items]
      except (TypeError, ValueError):
        raise ValueError(f"expected comma-separated {kind.__name__} values, "
                         f"got {argument!r}") from None
      if length is not None and len(values) != length:
        raise ValueError(f"expected {length} comma-separated values, got {argument!r}")
      if len(values) < min_length:
        raise ValueError(f"expected at least {min_length} value(s), got {argument!r}")
      return values

    def flag_type(self):
      return f"comma-separated list of {kind.__name__}"

  module = sys._getframe(1).f_globals.get("__name__")  # --help lists it with the caller's flags
  return flags.DEFINE(NumberListParser(), name, default, help, flag_values=fv,
                      serializer=flags.CsvListSerializer(","),
                      module_name=sys.argv[0] if module == "__main__" else module)


def flag_namespace(holders):
  """{name: FlagHolder} (what a `define` of `fusionsam_jax.cli.driver.run_cli` returns) as an
  object with one attribute per flag value (``args.batches``)."""
  import types
  return types.SimpleNamespace(**{name: h.value for name, h in holders.items()})


def define_profile_calls(fv):
  """``--profile_calls N``: after timing a JAX mode at its largest batch, trace N more calls
  under the JAX profiler (GPU) and record where the device time goes."""
  from absl import flags
  return flags.DEFINE_integer("profile_calls", 0, "after timing each JAX mode at its largest "
                              "batch, trace this many calls under the JAX profiler and record "
                              "kernel time by class and the costliest kernels "
                              "(benchmarks/trace_summary.py; GPU only)", flag_values=fv)


def profile_calls(fn, calls: int, name: str) -> dict:
  """`trace_summary.profile` of ``fn`` into a fresh temporary folder; a CPU run (no device
  kernels) gives ``{"error": ...}``."""
  from benchmarks import trace_summary
  try:
    return trace_summary.profile(fn, calls, tempfile.mkdtemp(prefix=f"trace_{name}_"))
  except ValueError as e:
    return {"error": str(e)}


def jax_mode(mode: str):
  """A JAX mode string of the encoder benchmarks, 'bf16-auto+erfc' -> ('bf16', 'auto',
  {'erfc'}), and sets the model switches its options name ('+erfc': `jax.nn.gelu`'s erfc
  form of the exact GELU instead of the erf form; `sam.common.GELU_ERFC`)."""
  from fusionsam_jax.models.sam import common as sam_common
  prec, _, rest = mode.partition("-")
  impl, *opts = (rest or "xla").split("+")
  unknown = set(opts) - {"erfc"}
  if unknown:
    raise ValueError(f"mode {mode!r}: unknown option(s) {sorted(unknown)}; known: erfc")
  sam_common.GELU_ERFC = "erfc" in opts
  return prec, impl, set(opts)
