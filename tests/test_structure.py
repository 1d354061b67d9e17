"""The house: every import of the package (module level and inside functions) runs down the
floors, never up, and no two modules import each other through any path.

Floors, lowest first: base (errors, config, layers, rope, sharding, safe_write,
xla_defaults) < ops (pure attention functions and mask geometry) < kernels (pallas_kernels) <
sea (SEA's modules) < seam (attention.py) < models (decoder, opt, llama) < io (hf_io, gguf_io,
families, tokenizer, data, checkpoint, bundle) < tasks (losses, flags, evaluate, generate, visualize,
convert, training).
"""
from __future__ import annotations

import ast
import pathlib

from conftest import REPO

FLOORS = ("base", "ops", "kernels", "sea", "seam", "models", "io", "tasks")
BY_NAME = {
    "base": ("sea_jax.errors", "sea_jax.config", "sea_jax.layers", "sea_jax.rope",
             "sea_jax.sharding", "sea_jax.safe_write", "sea_jax.xla_defaults", "sea_jax"),
    "seam": ("sea_jax.attention",),
    "models": ("sea_jax.decoder", "sea_jax.opt", "sea_jax.llama"),
    "io": ("sea_jax.hf_io", "sea_jax.gguf_io", "sea_jax.families", "sea_jax.tokenizer",
           "sea_jax.data",
           "sea_jax.checkpoint", "sea_jax.bundle"),
}


def floor_of(module: str) -> str:
  if module.startswith("sea_jax.ops"):
    return "ops"
  if module.startswith("pallas_kernels"):
    return "kernels"
  if module.startswith("sea_jax.sea"):
    return "sea"
  for floor, names in BY_NAME.items():
    if module in names:
      return floor
  return "tasks"


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in ("sea_jax", "pallas_kernels"):
    for path in (REPO / package).rglob("*.py"):
      parts = list(path.relative_to(REPO).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
  """Every package module `path` imports, anywhere in the file (lazy imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name:
        found.add(name)
  return found


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def test_no_import_runs_up_a_floor():
  up = []
  for module, targets in graph().items():
    for target in targets:
      if FLOORS.index(floor_of(target)) > FLOORS.index(floor_of(module)):
        up.append(f"{module} ({floor_of(module)}) -> {target} ({floor_of(target)})")
  assert not up, "imports running up a floor:\n" + "\n".join(sorted(up))


def test_kernels_import_only_ops():
  for module, targets in graph().items():
    if floor_of(module) == "kernels":
      outside = {t for t in targets if floor_of(t) not in ("ops", "kernels")}
      assert not outside, f"{module} imports {sorted(outside)}"


def test_no_import_circle():
  g = graph()
  # a package's __init__ re-exporting its own modules is not a circle between floors
  edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))}
           for m, ts in g.items()}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in sorted(edges.get(m, ())):
      if state.get(t) == 1:
        raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m)
