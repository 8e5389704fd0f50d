"""The code's shape: dependencies point one way (no import cycle, function-level imports included)
and no module of `manualbp/` or `triton_kernels/` is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (triton_kernels/ is manualbp.triton_kernels).
PACKAGES = {ROOT / "manualbp": "manualbp", ROOT / "triton_kernels": "manualbp.triton_kernels"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every manualbp module `name` imports, anywhere in the file (functions and TYPE_CHECKING too).

    `from a import b` depends on module a.b when that is a module, else on a itself.
    """
    here = name if _is_package(path) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_sees_a_function_level_import() -> None:
    """Negative control: a deferred import back into an importer is reported as a cycle."""
    graph = _graph()
    assert "manualbp.ops.linear_act" in graph["manualbp.functional"]
    graph["manualbp.ops.linear_act"] = graph["manualbp.ops.linear_act"] | {"manualbp.functional"}
    assert any({"manualbp.functional", "manualbp.ops.linear_act"} <= set(c) for c in _cycles(graph))


def test_function_level_imports_are_walked(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from manualbp import functional\n    from . import nn\n")
    modules = {"manualbp.functional": Path("f.py"), "manualbp.nn": Path("n.py"), "manualbp.m": module}
    assert _imports("manualbp.m", module, modules) == {"manualbp.functional", "manualbp.nn"}


def test_layers_point_down() -> None:
    """ops/* never import the modules above them; backends and activations never import ops."""
    graph = _graph()
    above_ops = ("manualbp.functional", "manualbp.nn", "manualbp.convert", "manualbp.optim",
                 "manualbp.jacobian", "manualbp.lightning", "manualbp.bench")  # fmt: skip
    for name, deps in graph.items():
        if name.startswith("manualbp.ops"):
            assert not [d for d in deps if d.startswith(above_ops)], name
        if name.startswith(("manualbp.backends", "manualbp.activations", "manualbp.triton_kernels")):
            assert not [d for d in deps if d.startswith("manualbp.ops") or d == "manualbp"], name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_500_lines(name: str) -> None:
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines, expected at most {MAX_LINES}"
