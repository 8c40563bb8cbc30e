"""The package's import structure, read from the source with `ast` (nothing is imported).

Layers, top to bottom:
    cli  →  workflow  →  steps  →  shared libraries
A module may import its own layer or any layer below it, never one above: the CLI is the
only place that knows about click commands' callbacks, the workflow runs steps, a step
never knows it runs inside a workflow, and a shared library knows no step.

Rules: EVERY import counts, module-level or inside a function (a lazy import is still a
dependency, only a slower one to notice):
- upward imports: none;
- cycles: none. A function-level import cannot fail the way a cycle at import time does, but a
  circle through one still means two modules that each need the other: neither can be read,
  tested or moved alone (artifacts ↔ gguf was one, until artifacts became a package and the
  GGUF conversion a client of its output module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "phitune"

STEP_PACKAGES = ("quantize", "finetune", "export", "infer", "serve", "eval", "registry")
# `python -m phitune` is the entry point, above everything.
LAYERS = {"__main__": 4, "cli": 3, "workflow": 2, **{name: 1 for name in STEP_PACKAGES}}  # rest: 0


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path, package: str | None = None) -> list[tuple[str, bool]]:
    """(imported phitune module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    # an `if TYPE_CHECKING:` or try block at module level still runs at import time
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    if package is None:
        own = module_name(path)
        package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from phitune import ui` imports the module phitune.ui
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        else:
            continue
        found += [(n, id(node) in top) for n in names if n == "phitune" or n.startswith("phitune.")]
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return ((PKG.parent / rel).with_suffix(".py").is_file()
            or (PKG.parent / rel / "__init__.py").is_file())


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def test_no_module_imports_a_layer_above_it():
    upward = []
    for name, path in all_modules().items():
        for target, _ in imports(path):
            if layer(target) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {target} "
                              f"(layer {layer(target)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycle():
    modules = all_modules()
    graph = {name: sorted({t for t, _top in imports(path) if t in modules and t != name})
             for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    # A package's __init__ re-exporting its own submodules is not a cycle users can trip on
    # unless a submodule imports the package back, which the walk does catch.
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source, expected", [
    ("from phitune.cli.main import main\n", [("phitune.cli.main", True)]),
    ("def f():\n    from phitune import ui\n", [("phitune.ui", False)]),
])
def test_the_import_reader_sees_both_kinds(tmp_path, source, expected):
    """The checks above could pass by reading nothing: this one fails if the reader misses
    a module-level or a function-level import."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imports(path, package="phitune") == expected


# ------------------------------------------------------------------ function length

MAX_FUNCTION_LINES = 60


def long_functions(path: Path, name: str | None = None,
                   limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`module:line name (N lines)` for each def / async def longer than `limit` lines, from
    its `def` line to its last line: a nested function counts within its parent (and is
    checked on its own too). Decorators are not counted."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{name or module_name(path)}:{node.lineno} {node.name} "
                             f"({lines} lines)")
    return found


def test_no_function_is_over_60_lines():
    """A function longer than a screen does more than one job: split it into named steps."""
    long = [entry for name, path in sorted(all_modules().items())
            for entry in long_functions(path, name)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_length_check_sees_nested_and_async_functions(tmp_path):
    """The check above could pass by measuring nothing: a 61-line async def and a short
    outer function whose nested function makes it 61 lines must both be named."""
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    path = tmp_path / "probe.py"
    path.write_text("async def flat():\n" + body
                    + "def outer():\n    def inner():\n" + body.replace("    ", "        ")
                    + "def short():\n" + body[:-len("    x59 = 59\n")])
    assert [e.split(" ", 1)[1] for e in long_functions(path, "probe")] == \
        ["flat (61 lines)", "outer (62 lines)", "inner (61 lines)"]
