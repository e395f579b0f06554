"""The benchmark scripts' absl flags: every command that the docs show for a script on
`fusionsam_jax.cli.driver.run_cli` (its docstring, README.md, docs/*.md) parses with that
script's flags, and comma-separated number lists parse as documented. Nothing is run."""

import glob
import importlib.util
import os
import re
import shlex

import pytest
from absl import flags

from fusionsam_jax.cli.driver import EXIT_USAGE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {}
for _path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
  with open(_path) as _f:
    if "def _define(fv)" in _f.read():
      SCRIPTS[os.path.splitext(os.path.basename(_path))[0]] = _path


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS[name])
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _documented_commands():
  """(where, script, argument string) of each command naming a run_cli benchmark script."""
  out = []
  for name, path in SCRIPTS.items():
    with open(path) as f:
      doc = re.match(r'r?"""(.*?)"""', f.read(), re.S).group(1)
    for cmd in re.findall(rf"python benchmarks/{name}\.py((?:[^\n]*\\\n)*[^\n]*)", doc):
      out.append((f"{name}.py docstring", name, cmd))
  docs = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                            "*.md")))
  for path in docs:
    with open(path) as f:
      text = f.read()
    for span in re.findall(r"`([^`]*)`", text):
      m = re.search(r"benchmarks/(\w+)\.py(.*)", span, re.S)
      if m and m.group(1) in SCRIPTS:
        out.append((os.path.relpath(path, ROOT), m.group(1), m.group(2)))
  return out


COMMANDS = _documented_commands()


def test_every_converted_script_has_documented_commands():
  assert set(SCRIPTS) >= {"encoder_profile", "fmp_attention", "input_pipeline", "sam2_encoder",
                          "sam2_parity", "sam_amg", "sam_encoder", "sam_parity"}
  assert {name for _, name, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize("where,name,args", COMMANDS,
                         ids=[f"{w}:{n}:{i}" for i, (w, n, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, name, args):
  args = re.sub(r"#[^\n]*", "", args.replace("\\\n", " "))  # continuations, comments
  argv = shlex.split(args.replace("[", " ").replace("]", " "))  # optional parts: [--batch 4]
  fv = flags.FlagValues()
  _load(name)._define(fv)
  rest = fv([name] + argv)[1:]
  assert rest == [], f"{where}: `{name}.py{args}` leaves {rest} unparsed"


def test_number_lists():
  from benchmarks.common import define_number_list
  fv = flags.FlagValues()
  batches = define_number_list(fv, "batches", [1, 4, 8], "", min_length=1)
  size = define_number_list(fv, "size", [480, 640], "", length=2)
  scale = define_number_list(fv, "scale", [0.5, 2.0], "", kind=float, length=2)
  fv(["prog", "--batches=2,16", "--scale", "0.25,3"])
  assert (batches.value, size.value, scale.value) == ([2, 16], [480, 640], [0.25, 3.0])
  for bad in (["--size=96"], ["--batches=1,x"], ["--batches="], ["--scale=1,2,3"]):
    with pytest.raises(flags.IllegalFlagValueError):
      fv(["prog"] + bad)


def test_space_separated_list_is_a_usage_error(capsys):
  # The former argparse form: `fp32` goes to --jax_modes, `bf16-xla` is left over.
  assert _load("sam_encoder").main(["--jax-modes", "fp32", "bf16-xla"]) == EXIT_USAGE
  assert "unexpected arguments: bf16-xla" in capsys.readouterr().err
