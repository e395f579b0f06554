"""The command-line tools: each a module of this package with ``define(fv)`` (its flags)
and ``body(f, args)`` (parse nothing, call the library, print, return an exit status), run
by the one driver (`driver`). `COMMANDS` declares them once:

    python -m fusionsam_jax <command> [flags]          # any command
    python -m fusionsam_jax.train --config ...          # the documented spellings, kept
"""

#: command -> (module of this package, the documented ``python -m`` / script spelling).
COMMANDS = {
    "train": ("train", "python -m fusionsam_jax.train"),
    "evaluate": ("evaluate", "python -m fusionsam_jax.evaluate"),
    "predict": ("predict", "python -m fusionsam_jax.predict"),
    "report": ("report", "python -m fusionsam_jax.evaluators.report"),
    "ablate": ("ablate", "python -m fusionsam_jax.ablate"),
    "baseline": ("baseline", "python -m fusionsam_jax.baseline"),
    "prepare": ("prepare", "python -m fusionsam_jax.data.prepare"),
    "generate": ("generate", "python -m fusionsam_jax.data.generate"),
    "miou": ("miou", "python -m fusionsam_jax.metrics.miou"),
    "sod": ("sod", "python -m fusionsam_jax.metrics.sod"),
    "convert_sam": ("convert_sam", "python tools/convert_sam_weights.py"),
    "convert_sam2": ("convert_sam2", "python tools/convert_sam2_weights.py"),
    "convert_vgg16": ("convert_vgg16", "python tools/convert_vgg16.py"),
}


def command(name: str):
  """The module of command `name` (imported on use: a command's imports are its own)."""
  import importlib
  if name not in COMMANDS:
    raise KeyError(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
  return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


def main(argv=None) -> None:
  """``python -m fusionsam_jax <command> [flags]`` (and the ``fusionsam`` script)."""
  import sys
  from fusionsam_jax.cli import driver
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    width = max(len(n) for n in COMMANDS)
    print("usage: python -m fusionsam_jax <command> [flags]   (<command> --help for its "
          "flags)\n\ncommands:")
    for name, (_, spelling) in COMMANDS.items():
      print(f"  {name:<{width}}  also: {spelling}")
    sys.exit(0 if argv else driver.EXIT_USAGE)
  if argv[0] not in COMMANDS:
    print(f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    sys.exit(driver.EXIT_USAGE)
  driver.main(command(argv[0]), argv[1:])
