"""docs/reliability.md stays current: every test its tables name exists."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tests(path):
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read())
  return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_named_test_exists():
  with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
    text = f.read()
  named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
  assert len(named) >= 25
  missing = [f"{p}::{t}" for p, t in named
             if not os.path.isfile(os.path.join(ROOT, p)) or t not in _tests(p)]
  assert not missing
