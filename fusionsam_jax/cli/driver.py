"""The one driver of every command-line tool: absl flags, one-line errors, exit statuses.

Every command (`fusionsam_jax.cli.COMMANDS`) is a module with ``define(fv) -> {name:
FlagHolder}`` and ``body(f, args) -> exit status``; `run_cli` parses its flags on a private
``absl.flags.FlagValues`` (``--config FILE[:variants]`` and ``--config.KEY=VALUE`` through
ml_collections' `config_flags` where a command takes a config), prints usage errors as one
line (exit 2) and turns the library's exceptions into one line and an exit status
(`exit_status`): the library raises, this module prints.

Exit statuses: 0 done; 1 bad input or setup (missing dataset or weights, no checkpoint, a
damaged file, a full disk); 2 usage (a flag, config file, variant or key that does not exist,
a workdir that cannot be used); 3 a non-finite loss; 4 a workdir made by another config.
"""

from __future__ import annotations

import logging
import os

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NONFINITE, EXIT_CONFIG = 0, 1, 2, 3, 4


def quiet_logs() -> None:
  """INFO logs of absl / orbax / the training loop are noise on the console: warnings only
  (metrics go to metrics.jsonl and TensorBoard)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


#: The glibc tunable that asks for transparent huge pages on malloc's mmap'd chunks.
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
#: The kernel's transparent-huge-page mode (``always [madvise] never``).
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def reexec_with_huge_pages() -> None:
  """Runs this command again (same interpreter and arguments, `os.execve`) with
  ``GLIBC_TUNABLES`` extended by ``glibc.malloc.hugetlb=1``, once, where that helps: Linux
  with glibc >= 2.35 and transparent huge pages on request (THP mode ``madvise``). Call it
  first thing in a CLI, before JAX is imported. Does nothing when the variable already
  sets that tunable, with ``FUSIONSAM_HUGEPAGES=0``, or when the exec fails.

  Why: XLA's CPU runtime allocates an executable's temporaries afresh on every call (one
  malloc of 90-180 MB per step in the demo, which glibc serves with mmap), so every step
  touches them again page by page: ~45 000 minor page faults per tokenizer step, ~30 % of
  the CPU time spent in the kernel on a 2-core machine. With the tunable glibc marks those
  mappings for huge pages (~500 faults a step): steps 4-11 % shorter, bitwise the same
  results. Glibc reads tunables only at start-up, hence the exec."""
  import platform
  import sys
  if not sys.platform.startswith("linux") or os.environ.get("FUSIONSAM_HUGEPAGES") == "0":
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if HUGETLB_TUNABLE in tunables or not getattr(sys, "orig_argv", None):
    return
  lib, version = platform.libc_ver()
  try:
    if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return
    with open(THP_ENABLED) as f:
      if "[madvise]" not in f.read():
        return
  except (OSError, ValueError):
    return
  env = dict(os.environ, GLIBC_TUNABLES=(tunables + ":" if tunables else "")
             + f"{HUGETLB_TUNABLE}=1")
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
  except OSError:
    return


#: Default location of JAX's persistent compilation cache for the CLIs.
DEFAULT_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
    "fusionsam_jax", "jax_compilation_cache")


#: Size limit of that cache (least recently used entries go first).
COMPILATION_CACHE_MAX_BYTES = 16 << 30


def enable_compilation_cache(path: str | None) -> None:
  """JAX's persistent compilation cache at `path` (None / "": off), so that a second run of
  a config loads its compiled steps instead of compiling them again. ``JAX_COMPILATION_CACHE_DIR``
  in the environment wins."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not path or str(path).lower() == "none":
    return
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  # A size limit turns on least-recently-used eviction and, with it, the cache's file lock:
  # concurrent runs sharing the default location would otherwise race on an entry's write.
  if jax.config.jax_compilation_cache_max_size in (None, -1):
    backfill_cache_atimes(path)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


def backfill_cache_atimes(path: str) -> None:
  """Gives every entry of the compilation cache at `path` the access-time file that JAX's
  eviction reads for all entries on every write: entries written without a size limit (by
  an earlier version, or another tool) have none, and every later write would then fail."""
  import time
  d = os.path.abspath(os.path.expanduser(path))
  try:
    names = set(os.listdir(d))
  except OSError:
    return
  stamp = time.time_ns().to_bytes(8, "little")
  for n in names:
    if n.endswith("-cache") and n[:-len("-cache")] + "-atime" not in names:
      try:
        with open(os.path.join(d, n[:-len("-cache")] + "-atime"), "wb") as f:
          f.write(stamp)
      except OSError:
        pass


class UsageError(Exception):
  """A bad command line: printed as one line, exit status `EXIT_USAGE`."""


_HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def _underscored(argv: list[str], fv) -> list[str]:
  """The old argparse spellings, ``--manual-dir X`` / ``--no-progress``, as the absl ones,
  ``--manual_dir X`` / ``--noprogress``: a hyphenated name is rewritten only where the
  underscored one is a defined flag (so nothing else changes meaning)."""
  from absl import flags
  out = []
  for i, a in enumerate(argv):
    if a == "--":
      return out + argv[i:]
    if a.startswith("--") and "-" in a[2:].split("=", 1)[0]:
      name, eq, val = a[2:].partition("=")
      under = name.replace("-", "_")
      if under in fv:
        a = f"--{under}{eq}{val}"
      elif (under.startswith("no_") and under[3:] in fv
            and isinstance(fv[under[3:]], flags.BooleanFlag)):
        a = f"--no{under[3:]}{eq}{val}"
    out.append(a)
  return out


def run_cli(define, body, argv=None, *, prog: str, doc: str | None = None,
            required: tuple[str, ...] = (), positional: bool = False) -> int:
  """Runs a command-line tool on absl flags: the one flags library of every CLI here.

  `define(fv)` defines the tool's flags on `fv` (a private ``absl.flags.FlagValues``, so the
  tools never clash with each other or with a caller's flags, and tests may call a tool's
  ``main([...])`` in-process any number of times) and returns {name: FlagHolder};
  `body(f, args)` runs the tool with those holders and the positional arguments (``[]`` unless
  `positional`) and returns the exit status. `argv`: the arguments without the program name
  (None: ``sys.argv[1:]``). A usage error (unknown flag, bad value, missing `required` flag,
  unexpected positional argument, or `UsageError` raised by `body`) prints one line,
  ``error: ...``, and returns `EXIT_USAGE` (2); ``--help`` prints `doc` and the flags, returns
  0. absl accepts ``--flag=value`` and ``--flag value``, and booleans as ``--flag`` /
  ``--noflag``; the old hyphenated spellings (``--manual-dir``, ``--no-progress``) are
  rewritten to these."""
  import sys
  from absl import flags
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  holders = define(fv)
  if any(a in _HELP_ARGS for a in argv[:argv.index("--") if "--" in argv else len(argv)]):
    print((doc or "").strip() + f"\n\nusage: {prog} [flags]\n", file=sys.stdout)
    print(fv.get_help(include_special_flags=False))
    return EXIT_OK
  try:
    try:
      rest = fv([prog] + _underscored(argv, fv))[1:]
    except flags.Error as e:
      raise UsageError(one_line(e)) from None
    except Exception as e:  # noqa: BLE001 -- a config flag's loader / overrides raise anything
      raise UsageError(_config_error(e, argv)) from None
    if rest and not positional:
      raise UsageError(f"unexpected arguments: {' '.join(rest)}")
    missing = [n for n in required if holders[n].value in (None, "", [])]
    if missing:
      raise UsageError(", ".join(f"--{n}" for n in missing) +
                       (" is" if len(missing) == 1 else " are") + " required")
    return body(holders, rest)
  except UsageError as e:
    print(f"error: {e} (see --help)", file=sys.stderr)
    return EXIT_USAGE
  except Exception as e:  # noqa: BLE001 -- the library's errors: one line (bugs re-raised)
    return print_error(e)


def _config_error(e: BaseException, argv: list[str]) -> str:
  """A config file / ``--config.KEY`` failure as one line naming the flag and the key."""
  import re
  text = str(e)
  if isinstance(e, (AttributeError, KeyError)):
    guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    quoted = re.search(r"'(\w+)'", text)
    key = guess.group(2) if guess else (quoted.group(1) if quoted else text.strip("'\" "))
    given = [a.split("=")[0] for a in argv
             if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if given:
      return (f"{', '.join(given)}: unknown config key {key!r}"
              + (f" (did you mean {guess.group(1)!r}?)" if guess
                 else " (see the config file for the keys it has)"))
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing:
    return f"--config {missing.group(1)}: No such file or directory"
  return f"bad command line ({type(e).__name__}: {one_line(e)})"


class captured_stderr:
  """Context manager: Python-level stderr of the body -- the tracebacks and log lines that
  Orbax / tensorstore writer threads print when a write fails -- goes to a buffer (`.text`),
  so that a CLI prints its one-line error alone (and the buffer only with ``--verbose``)."""

  def __enter__(self):
    import io
    import logging
    import sys
    self._saved = sys.stderr
    self._buf = io.StringIO()
    sys.stderr = self._buf
    self._handlers = []
    for h in logging.getLogger().handlers + logging.getLogger("absl").handlers:
      stream = getattr(h, "stream", None)
      if stream is self._saved or stream is getattr(sys, "__stderr__", None):
        self._handlers.append((h, stream))
        h.stream = self._buf
    return self

  def __exit__(self, *exc):
    import sys
    sys.stderr = self._saved
    for h, stream in self._handlers:
      h.stream = stream
    return False

  @property
  def text(self) -> str:
    return self._buf.getvalue()


def exit_now(rc: int) -> None:
  """Ends a CLI process with `rc`; after a failure without running interpreter shutdown, where
  library writer threads (Orbax, tensorstore) would still print tracebacks."""
  import sys
  if rc == 0:
    sys.exit(0)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(rc)


def one_line(e: BaseException) -> str:
  """An exception as one line: its innermost non-empty message line (library messages are one
  line already; ml_collections / absl wrap theirs in several)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def converter_flags(fv, what: str, variants: str) -> dict:
  """The flags of a weight converter CLI (tools/convert_*_weights.py)."""
  from absl import flags
  return {
      "checkpoint": flags.DEFINE_string("checkpoint", None, f"official {what} file",
                                        flag_values=fv),
      "output": flags.DEFINE_string("output", None, "output directory", flag_values=fv),
      "model_type": flags.DEFINE_string("model_type", "auto", variants, flag_values=fv),
      "overwrite": flags.DEFINE_bool("overwrite", False, "replace an existing output (only a "
                                     "checkpoint folder this converter wrote)", flag_values=fv),
      "verbose": flags.DEFINE_bool("verbose", False, "on an error, also print what the "
                                   "libraries logged (tracebacks)", flag_values=fv),
  }


def _silence_late_thread_errors() -> None:
  """After a failed write, Orbax's / tensorstore's writer threads can still report errors of
  their own (an asyncio loop closed under a pending callback: "Exception ignored in ...")
  while the CLI prints its one line and exits; the failure is already reported, so those
  reports are dropped (--verbose keeps them)."""
  import sys
  import threading
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None


def run_converter(f, convert_file, error_type, preset_name) -> int:
  """A converter CLI's body: `convert_file(checkpoint, output, model_type, overwrite) ->
  (cfg, out)`; an `error_type` is one line (libraries' tracebacks only with --verbose)."""
  import sys
  ckpt = f["checkpoint"].value
  error = None
  with captured_stderr() as log:
    try:
      cfg, out = convert_file(ckpt, f["output"].value, f["model_type"].value,
                              f["overwrite"].value)
    except error_type as e:
      error = e
      if not f["verbose"].value:
        _silence_late_thread_errors()
  if error is None or f["verbose"].value:
    sys.stderr.write(log.text)   # warnings of a good run; tracebacks only with --verbose
  if error is not None:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"converted {ckpt} ({preset_name(cfg) or 'custom'}) -> {out}")
  return 0


def os_error_line(e: OSError) -> str:
  """An OSError as one line that says what to do (a full disk: free space, re-run)."""
  import errno
  if e.errno == errno.ENOSPC:
    where = f" writing {e.filename}" if e.filename else ""
    return (f"no space left on the device{where}; free some space (or move --workdir), then "
            "re-run the same command: it resumes")
  return str(e)


def exit_status(e: BaseException) -> int | None:
  """The exit status of a library exception a user can act on (None: a bug, re-raised).

  One table for every command: config mismatches 4, non-finite losses 3, unusable workdirs
  and usage errors 2, everything the user can fix (setup, data, checkpoints, values, files)
  1."""
  from fusionsam_jax.errors import SetupError, WorkdirError
  from fusionsam_jax.training.checkpointing import CheckpointRestoreError
  from fusionsam_jax.training.guards import ConfigMismatchError, NonFiniteLossError
  from fusionsam_jax.errors import ConfigValueError
  if isinstance(e, (UsageError, ConfigValueError)):
    return EXIT_USAGE
  if isinstance(e, (ConfigMismatchError,)):
    return EXIT_CONFIG
  if isinstance(e, NonFiniteLossError):
    return EXIT_NONFINITE
  if isinstance(e, WorkdirError):
    return EXIT_USAGE
  if isinstance(e, (SetupError, CheckpointRestoreError, ValueError, OSError)):
    from fusionsam_jax.training.checkpointing import CheckpointMismatchError
    return EXIT_CONFIG if isinstance(e, CheckpointMismatchError) else EXIT_ERROR
  return None


def print_error(e: BaseException) -> int:
  """Prints `e` as one ``error: ...`` line on stderr; returns its `exit_status` (re-raises
  what is not a user error)."""
  import sys
  rc = exit_status(e)
  if rc is None:
    raise e
  from fusionsam_jax.data.inputs import InputError
  from fusionsam_jax.data.io import DatasetError
  if isinstance(e, (DatasetError, InputError)):
    msg = str(e).strip()   # its first line says what is wrong; the rest shows the layout
  else:
    msg = os_error_line(e) if isinstance(e, OSError) else one_line(e)
  print(f"error: {msg}", file=sys.stderr, flush=True)
  return rc


def config_flag(fv, help_string: str = "experiment config file (configs/*.py[:variant,...])"):
  """``--config FILE[:variants]`` with ``--config.KEY=VALUE`` overrides, on `fv`."""
  from ml_collections import config_flags
  return config_flags.DEFINE_config_file("config", None, help_string, flag_values=fv)


def loaded_config(holder):
  """The config a `config_flag` holds, overrides normalised (`config_lib.normalize_overrides`;
  None when not given). A config file that does not load raises `UsageError`."""
  from fusionsam_jax.config_lib import normalize_overrides
  try:
    config = holder.value
    if config is not None:
      config.keys()   # ml_collections defers a loader's error to the first access
  except Exception as e:  # noqa: BLE001 -- a config file's loader raises anything
    import re
    missing = re.search(r"No such file or directory: '([^']+)'", str(e))
    if missing:
      raise UsageError(f"--config {missing.group(1)}: No such file or directory") from None
    raise UsageError(f"--config: {one_line(e)}") from None
  return None if config is None else normalize_overrides(config)


def run(module, argv=None) -> int:
  """Runs command `module` (its `define`, `body`, docstring) on `argv` (None: the process's
  arguments); returns its exit status."""
  from fusionsam_jax.cli import COMMANDS
  name = module.__name__.rsplit(".", 1)[-1]
  prog = next((spelling for mod, spelling in COMMANDS.values() if mod == name),
              f"python -m {module.__name__}")
  return run_cli(module.define, module.body, argv, prog=prog, doc=module.__doc__,
                 required=getattr(module, "REQUIRED", ()),
                 positional=getattr(module, "POSITIONAL", False))


def main(module, argv=None) -> None:
  """`run` as a program: exits with the command's status. A command marked ``HEAVY``
  (it compiles) re-executes once with huge pages first (`reexec_with_huge_pages`); one
  marked ``EXIT_NOW`` ends without interpreter shutdown after a failure (`exit_now`)."""
  import sys
  if getattr(module, "HEAVY", False):
    reexec_with_huge_pages()
  rc = run(module, argv)
  if getattr(module, "EXIT_NOW", False):
    exit_now(rc)
  sys.exit(rc)


def compilation_cache_flag(fv):
  """``--compilation_cache DIR`` ('' = off), for the commands that compile."""
  from absl import flags
  return flags.DEFINE_string(
      "compilation_cache", DEFAULT_COMPILATION_CACHE, "JAX persistent compilation cache "
      "folder ('' = off): a second run loads its compiled programs", flag_values=fv)
