"""The README's commands and imports stay runnable: every ``python -m`` / ``python tools/``
command in a fenced block names an existing command whose flags exist (``--config.KEY``
included, read off the config file the command names), every file it names in the repo
exists, and every ``from fusionsam_jax... import`` line of a Python block imports."""

from __future__ import annotations

import importlib
import os
import re
import shlex

import pytest
from absl import flags

from fusionsam_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README] + [os.path.join(ROOT, "docs", f) for f in ("own_data.md", "extending.md")]

#: documented spelling -> command name (`cli.COMMANDS`).
SPELLINGS = {spelling.split(" ", 2)[-1]: name for name, (_, spelling) in cli.COMMANDS.items()}


def blocks(path: str, lang: str) -> list[str]:
  if not os.path.isfile(path):
    return []
  text = open(path).read()
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(path: str) -> list[list[str]]:
  out = []
  for block in blocks(path, "bash"):
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      for part in line.split("&&"):
        words = shlex.split(part.strip())
        if len(words) >= 2 and words[0] in ("python", "python3"):
          out.append(words[1:])
  return out


def command_of(words: list[str]):
  """(command module, flag words) of ``-m MOD ...`` / ``tools/X.py ...``; None otherwise."""
  if words[0] == "-m":
    target, rest = words[1], words[2:]
    if target == "fusionsam_jax":
      return cli.command(rest[0]), rest[1:]
  else:
    target, rest = words[0], words[1:]
  if target in SPELLINGS:
    return cli.command(SPELLINGS[target]), rest
  return None


def all_commands():
  out = []
  for path in DOCS:
    for words in commands(path):
      if command_of(words) is not None:
        out.append(pytest.param(words, id=f"{os.path.basename(path)}:{' '.join(words[:3])}"))
  return out


def test_readme_has_the_demo_and_test_commands():
  text = open(README).read()
  assert "python -m fusionsam_jax.train --config configs/demo.py --workdir runs/demo" in text
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  test_cmd = next(c for c in blocks(README, "bash") if "pytest" in c).strip()
  install = test_cmd.split("&& ", 2)[2].rsplit(" && python -m pytest", 1)[0]
  for part in install.split(" && "):
    assert part in ci, f".ci/run does not run the README's {part!r}"
  assert len(text.splitlines()) <= 200, "README.md is a product page: 200 lines at most"


@pytest.mark.parametrize("words", all_commands())
def test_command_and_flags_exist(words):
  module, rest = command_of(words)
  fv = flags.FlagValues()
  holders = module.define(fv)
  config_file = None
  for w in rest:
    if not w.startswith("--"):
      continue
    name, _, value = w[2:].partition("=")
    if name.startswith("config."):
      continue
    base = name[2:] if name.startswith("no") and name[2:] in fv else name
    assert base in fv, f"{' '.join(words[:2])}: no flag --{name}"
    if name == "config":
      config_file = value
  idx = [i for i, w in enumerate(rest) if w == "--config"]
  if idx:
    config_file = rest[idx[0] + 1]
  keys = [w[len("--config."):].split("=")[0] for w in rest if w.startswith("--config.")]
  if config_file:
    path, _, arg = config_file.partition(":")
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path} does not exist"
    if keys and "config" in holders:
      spec = importlib.util.spec_from_file_location("readme_config", os.path.join(ROOT, path))
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      try:
        config = mod.get_config(arg or None)
      except Exception:  # noqa: BLE001 -- e.g. configs/custom.py:FOLDER for a folder not here
        return
      for key in keys:
        node = config
        for part in key.split("."):
          assert part in node, f"{config_file}: no config key {key}"
          node = node[part]


def test_python_imports_resolve():
  lines = [ln.strip() for path in DOCS for b in blocks(path, "python") for ln in b.splitlines()]
  imports = [ln for ln in lines if ln.startswith("from fusionsam_jax")]
  assert imports
  for ln in imports:
    m = re.match(r"from (\S+) import (.+)", ln)
    module = importlib.import_module(m.group(1))
    for name in m.group(2).split(","):
      name = name.strip().split(" as ")[0]
      assert hasattr(module, name), f"{ln}: {m.group(1)} has no {name}"


def test_linked_files_exist():
  text = re.sub(r"```.*?```", "", open(README).read(), flags=re.S)
  text = re.sub(r"`[^`]*`", "", text)
  for target in re.findall(r"\]\(([^)#]+)\)", text):
    if "://" in target:
      continue
    assert os.path.exists(os.path.join(ROOT, target)), f"README links {target}, not in the repo"
