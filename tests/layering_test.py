"""Layering: the package's import graph (including imports inside functions) has no cycles between its
layers, leaves never import their users, and each subpackage imports alone in a fresh interpreter."""

import ast
import pathlib
import subprocess
import sys

from tests import helpers

PACKAGE = helpers.ROOT / "mmdit_jax"
SUBPACKAGES = ("flow", "model", "encoders", "data", "parallel")
# What each layer may import (besides itself and mmdit_jax.errors): the allowed direction of every edge.
ALLOWED = {
    "flow": set(),
    "parallel": set(),
    "data": {"paths"},
    "model": {"parallel", "paths"},
    "encoders": {"model", "parallel", "paths"},
}


def _unit(module: str) -> str:
  """mmdit_jax.model.mmdit → 'model'; mmdit_jax.train → 'train' (top-level modules are their own unit)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: pathlib.Path, module: str):
  """Every mmdit_jax module imported anywhere in the file (top level or inside functions)."""
  tree = ast.parse(path.read_text())
  package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("mmdit_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      if base.startswith("mmdit_jax"):
        yield base
        yield from (f"{base}.{a.name}" for a in node.names)


def _graph():
  """{unit: units it imports}, a unit being a subpackage or a top-level module of mmdit_jax."""
  units = {p.stem for p in PACKAGE.glob("*.py")} | {d.name for d in PACKAGE.iterdir() if (d / "__init__.py").exists()}
  edges = {}
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(helpers.ROOT).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    src = _unit(module)
    for target in _imports(path, module):
      dst = _unit(target)
      if dst in units and dst != src:
        edges.setdefault(src, set()).add(dst)
  return edges


def _cycle(edges):
  state = {}

  def visit(node, stack):
    state[node] = "active"
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "active":
        return stack + [node, nxt]
      if nxt not in state:
        found = visit(nxt, stack + [node])
        if found:
          return found
    state[node] = "done"
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def test_import_graph_has_no_cycles_and_leaves_do_not_import_their_users():
  edges = _graph()
  assert _cycle(edges) is None, f"import cycle: {' → '.join(_cycle(edges))}"
  for layer, allowed in ALLOWED.items():
    bad = edges.get(layer, set()) - allowed - {"errors"}
    assert not bad, f"mmdit_jax.{layer} imports {sorted(bad)}; it may import only {sorted(allowed) or 'nothing'}"
  # The graph really was read: the training system depends on the layers below it.
  assert {"model", "data", "parallel", "flow"} <= edges["train_step"] | edges["train"] | edges["evaluate"]


def test_each_subpackage_imports_alone():
  procs = {name: subprocess.Popen([sys.executable, "-c", f"import mmdit_jax.{name}"], cwd=helpers.ROOT,
                                  env=helpers.env(), stderr=subprocess.PIPE, text=True)
           for name in SUBPACKAGES}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"import mmdit_jax.{name} alone failed:\n{err[-2000:]}"
