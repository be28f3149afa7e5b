"""The package's import rules (shared/DESIGN.md, "Layout"), read from the source of every module.

Layers, the ground first; a module may import its own layer and those before it, never one after it:

    parallel/, data/, models/, runtime      meshes and rules; data; Linen modules; process settings
    workdir                                 a run's directory: config, checkpoints, metrics files
    infer/, train/, interop/                decoding and the engine; training; Hugging Face
    eval/, serve/, api (the package too)    benchmarks and reports; the HTTP server; `vlmjax.load`
    cli                                     the `vlmjax` command

Besides: eval/ and serve/ import nothing from train/ (what they need of a run is in `workdir`), and no two
modules import each other, directly or through others. Imports inside functions count as much as those at the
top: they are dependencies all the same, only later.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vlmjax"
LAYERS = (
    ("parallel", "data", "models", "runtime"),
    ("workdir",),
    ("infer", "train", "interop"),
    ("eval", "serve", "api", "__init__"),
    ("cli",),
)
FORBIDDEN = {"eval": ("train",), "serve": ("train",)}  # {part: parts it must not import}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str) -> str:
  """The module a dotted name imports: `vlmjax.models.layers` or, for a name inside a module, that module."""
  while name and not ((PACKAGE.parent / name.replace(".", "/")).with_suffix(".py").exists()
                      or (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()):
    name = name.rpartition(".")[0]
  return name


def _imports(path: pathlib.Path) -> set[str]:
  """The vlmjax modules a file imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {_resolve(alias.name) for alias in node.names if alias.name.split(".")[0] == "vlmjax"}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlmjax":
      found |= {_resolve(f"{node.module}.{alias.name}") for alias in node.names}
  return found


GRAPH = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
  """The layer part of a module: `vlmjax.models.layers` -> models, `vlmjax` -> __init__, `vlmjax.api` -> api."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
  part = _part(module)
  index = next((i for i, parts in enumerate(LAYERS) if part in parts), None)
  assert index is not None, f"{module} belongs to no layer: add {part!r} to LAYERS (and to DESIGN.md's layout)"
  return index


def test_every_module_is_read():
  assert {"vlmjax.models.layers", "vlmjax.workdir", "vlmjax.api", "vlmjax.cli"} <= set(GRAPH)
  assert "vlmjax.models.kv_cache" in GRAPH["vlmjax.models.decoder"]  # a module imported by `from ... import`
  assert "vlmjax.models.layers" in GRAPH["vlmjax.models.vit"]  # a module imported as a name of its package


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_later_layer(module):
  later = sorted(imported for imported in GRAPH[module] if _layer(imported) > _layer(module))
  assert not later, f"{module} (layer {_layer(module)}) imports {later}, of later layers"


@pytest.mark.parametrize("part,forbidden", sorted(FORBIDDEN.items()))
def test_eval_and_serve_import_nothing_from_train(part, forbidden):
  offending = sorted(f"{module} -> {imported}" for module, imports in GRAPH.items() if _part(module) == part
                     for imported in imports if _part(imported) in forbidden)
  assert not offending, offending


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

  def visit(node):
    index[node] = low[node] = counter[0]
    counter[0] += 1
    stack.append(node)
    on_stack.add(node)
    for successor in graph.get(node, ()):
      if successor not in index:
        visit(successor)
        low[node] = min(low[node], low[successor])
      elif successor in on_stack:
        low[node] = min(low[node], index[successor])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_no_import_cycle():
  assert not _cycles(GRAPH), _cycles(GRAPH)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_command_serving_training_and_evaluation_leave_pytorch_and_transformers_unimported():
  # PyTorch is a test and benchmark reference only; where it is installed, a library that imports it when found
  # (tensorboardX does) adds a second or more to every start of `vlmjax`. transformers is for Hugging Face
  # checkpoints, imported when one is read or written.
  script = ("import sys, vlmjax.cli, vlmjax.serve.server, vlmjax.train.trainer, vlmjax.eval.harness; "
            "print(sorted(name for name in ('torch', 'transformers', 'tensorboardX') if name in sys.modules))")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
