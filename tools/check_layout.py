"""Checks the package's import graph: no cycles, no upward imports, function-level imports
only for heavy optional dependencies.

    python tools/check_layout.py            # prints the findings; exit 1 if any
    python tools/check_layout.py --stats    # also the layout's size (files, lines, imports)

Layers (data flow, lowest first). A module may import from its own layer or below, never
above:

    0 base       errors, fsutil, io helpers (`fusionsam_jax.io`), jit_utils, locking
    1 data       fusionsam_jax.data
    1 metrics    fusionsam_jax.metrics, losses
    2 models     fusionsam_jax.models (sam/, sam2/ included), sam, sam2 namespaces
    3 training   fusionsam_jax.training, workdir, config_lib
    4 stages     fusionsam_jax.stages, evaluators
    5 experiment fusionsam_jax.experiment, predictor, report
    6 cli        fusionsam_jax.cli and the `python -m fusionsam_jax.<name>` aliases

The graph is read with `ast` (no import of the package). A function-level import is allowed
when its target is outside the package and in `HEAVY` (torch, transformers, ...), in the
command layer (`fusionsam_jax.cli`: a command parses its flags before it imports the library,
so ``--help`` and usage errors answer before JAX loads), and under ``if __name__ ==
"__main__":`` (the ``python -m fusionsam_jax.<module>`` spellings that hand over to a command).
"""

from __future__ import annotations

import ast
import os
import sys

PKG = "fusionsam_jax"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

#: Optional or heavy third-party packages a function may import lazily.
HEAVY = ("torch", "transformers", "safetensors", "segment_anything", "sam2", "tensorboardX",
         "matplotlib", "tensorflow_datasets", "tensorflow", "grain", "py_sod_metrics",
         "pycocotools", "skimage", "sklearn", "importlib")

#: Layer of each module (longest prefix wins).
LAYERS = {
    f"{PKG}.errors": 0, f"{PKG}.fsutil": 0, f"{PKG}.io": 0, f"{PKG}.jit_utils": 0,
    f"{PKG}.locking": 0, f"{PKG}.palette": 0,
    f"{PKG}.data": 1, f"{PKG}.metrics": 1, f"{PKG}.losses": 1,
    f"{PKG}.models": 2, f"{PKG}.sam": 2, f"{PKG}.sam2": 2, f"{PKG}.sam_checkpoint": 2,
    f"{PKG}.sam2_predictor": 2, f"{PKG}.predictor": 5,
    f"{PKG}.training": 3, f"{PKG}.workdir": 3, f"{PKG}.config_lib": 3,
    f"{PKG}.stages": 4, f"{PKG}.evaluators": 4,
    f"{PKG}.experiment": 5, f"{PKG}.ablation": 5, f"{PKG}.inference": 5,
    f"{PKG}.cli": 6,
    f"{PKG}.train": 6, f"{PKG}.evaluate": 6, f"{PKG}.predict": 6, f"{PKG}.ablate": 6,
    f"{PKG}.baseline": 6, f"{PKG}.__main__": 6,
}


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def layer(mod: str) -> int | None:
  best = None
  for prefix, lay in LAYERS.items():
    if mod == prefix or mod.startswith(prefix + "."):
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, lay)
  return None if best is None else best[1]


def modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PKG)):
    for f in files:
      if f.endswith(".py"):
        p = os.path.join(dirpath, f)
        out[module_name(p)] = p
  return out


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = mod.split(".") if is_pkg else mod.split(".")[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, path: str, known: set[str]):
  """Yields (target module, lineno, function_level) for every import in `path`."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  type_checking: set[int] = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.If) and ("TYPE_CHECKING" in ast.unparse(n.test)
                                  or "__main__" in ast.unparse(n.test)):
      for m in ast.walk(n):
        type_checking.add(id(m))

  def visit(node, in_func):
    for child in ast.iter_child_nodes(node):
      f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if id(child) in type_checking:
        continue
      if isinstance(child, ast.Import):
        for a in child.names:
          yield a.name, child.lineno, in_func
      elif isinstance(child, ast.ImportFrom):
        base = resolve(mod, is_pkg, child)
        for a in child.names:
          full = f"{base}.{a.name}"
          yield (full if full in known else base), child.lineno, in_func
      yield from visit(child, f)

  yield from visit(tree, False)


def graph():
  mods = modules()
  known = set(mods)
  edges: dict[str, set[str]] = {m: set() for m in mods}
  problems, n_imports, n_func = [], 0, 0
  for mod, path in sorted(mods.items()):
    for target, line, in_func in imports(mod, path, known):
      n_imports += 1
      internal = target == PKG or target.startswith(PKG + ".")
      if in_func:
        n_func += 1
        top = target.split(".")[0]
        if layer(mod) != LAYERS[f"{PKG}.cli"] and (internal or top not in HEAVY):
          problems.append(f"{path}:{line}: function-level import of {target} (allowed only "
                          f"for heavy optional dependencies: {', '.join(HEAVY[:6])}, ...)")
      if not internal:
        continue
      while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
      if target == mod:
        continue
      edges[mod].add(target)
      lm, lt = layer(mod), layer(target)
      if lm is not None and lt is not None and lt > lm:
        problems.append(f"{path}:{line}: {mod} (layer {lm}) imports upward {target} "
                        f"(layer {lt})")
  return mods, edges, problems, n_imports, n_func


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan). A package's
  ``__init__`` that imports its own submodules is not a cycle with them."""
  def pkg_of(m):
    return m
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w.startswith(v + "."):   # a package importing its own children
        continue
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in sorted(edges):
    if v not in index:
      strong(v)
  return out


def package_cycles(edges):
  """Cycles between sub-packages (models <-> stages, ...), from module edges."""
  def pkg(m):
    parts = m.split(".")
    return ".".join(parts[:2])
  pe: dict[str, set[str]] = {}
  for a, bs in edges.items():
    for b in bs:
      if pkg(a) != pkg(b) and pkg(b) != PKG:
        pe.setdefault(pkg(a), set()).add(pkg(b))
      pe.setdefault(pkg(b), set())
    pe.setdefault(pkg(a), set())
  return cycles(pe)


def main(argv=None) -> int:
  from absl import flags
  fv = flags.FlagValues()
  stats = flags.DEFINE_bool("stats", False, "print the layout's size too", flag_values=fv)
  fv([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))
  mods, edges, problems, n_imports, n_func = graph()
  cyc = cycles(edges)
  pcyc = package_cycles(edges)
  for c in cyc:
    problems.append("module cycle: " + " -> ".join(c))
  for c in pcyc:
    problems.append("package cycle: " + " -> ".join(c))
  unlayered = sorted(m for m in mods if layer(m) is None and m != PKG)
  for m in unlayered:
    problems.append(f"{mods[m]}: module {m} has no layer in tools/check_layout.py LAYERS")
  if stats.value:
    lines = {m: sum(1 for _ in open(p)) for m, p in mods.items()}
    big = max(lines, key=lines.get)
    print(f"{len(mods)} modules, {sum(lines.values())} lines, largest {big} "
          f"({lines[big]} lines); {n_imports} imports, {n_func} inside functions; "
          f"{len(cyc)} module cycles, {len(pcyc)} package cycles")
  for p in problems:
    print(p)
  print(f"{len(problems)} problem(s)")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
