"""The module graph of tfla_cupy: no import cycle, no intra-package import hidden inside a
function, and every module importable alone in a fresh interpreter."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tfla_cupy"
#: Optional dependencies imported at the top of the adapters: those modules are tried only where
#: the dependency is installed.
ADAPTERS = {"tfla_cupy.torch": "torch", "tfla_cupy.jax": "jax"}


def _modules():
    """{dotted module name: path} of every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module, path, node):
    """The tfla_cupy modules an import node names (a package stands for its __init__)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "tfla_cupy"]
    base = node.module or ""
    if node.level:
        parent = package.split(".")
        parent = parent[:len(parent) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
    if not base.startswith("tfla_cupy"):
        return []
    names = [f"{base}.{a.name}" for a in node.names]
    return [n if n in MODULES else base for n in names]


def _imports(module, path):
    """(module-level imports, imports inside functions) of tfla_cupy modules."""
    tree = ast.parse(path.read_text())
    top, local = set(), set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (local if in_function else top).update(_resolve(module, path, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top - {module}, local - {module}


def test_the_import_graph_has_no_cycle():
    graph = {m: _imports(m, p)[0] for m, p in MODULES.items()}
    state, stack = {}, []

    def walk(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_no_intra_package_import_inside_a_function():
    found = {m: sorted(_imports(m, p)[1]) for m, p in MODULES.items()}
    assert {m: deps for m, deps in found.items() if deps} == {}


def test_the_checker_sees_a_cycle(tmp_path):
    """The graph walk above fails on a planted cycle (a test of the test)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from tfla_cupy import _arrays\n")
    b.write_text("def f():\n    from tfla_cupy import api\n")
    assert _imports("tfla_cupy.a", a) == ({"tfla_cupy._arrays"}, set())
    assert _imports("tfla_cupy.b", b) == (set(), {"tfla_cupy.api"})


def _importable(module):
    dep = ADAPTERS.get(module)
    return dep is None or importlib.util.find_spec(dep) is not None


@pytest.mark.slow
@pytest.mark.parametrize("module", [m for m in MODULES if _importable(m)])
def test_each_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                          cwd=PKG.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
