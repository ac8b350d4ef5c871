"""Package layering: which top-level packages may import which.

Every module of the checked packages is parsed with `ast` and every import is collected,
including imports inside functions, under ``if TYPE_CHECKING:`` and ``importlib.import_module`` /
``__import__`` calls with a literal name. ``loadtest/`` and ``tests/`` are not checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "evaluation", "finetune", "service", "shapes_world")
TORCH = ("torch", "transformers")

# Top-level package → the top-level modules it must never import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "export": frozenset({"evaluation", "finetune"}),
    "evaluation": frozenset({"finetune"}),
    # The fine-tuning side (torch) reaches the service only through the client library.
    "finetune": frozenset({"evaluation"}),
    "service": frozenset({"export", "evaluation", "finetune", "shapes_world", *TORCH}),
    "shapes_world": frozenset({"service", "export", "evaluation", "finetune", *TORCH}),
}
# The one exemption: service/cli.py is the single CLI entry point; its command functions lazily
# import the torch-side command modules (export, evaluation, finetune, shapes_world). It sits
# above every package, so it is exempt from service's export/evaluation/finetune/shapes_world
# rule and left out of the package graph; it must still never import torch or transformers itself.
CLI_ENTRY_POINT = "service/cli.py"
CLI_FORBIDDEN = frozenset(TORCH)


@dataclass(frozen=True)
class Import:
    """One import statement: where it is and the top-level module it names."""

    path: str  # relative to the repository root, "/"-separated
    line: int
    target: str  # top-level module ("torch", "service", ...)

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def imports_in(source: str, path: str) -> list[Import]:
    """Every import in `source` (a module at repository-relative `path`), at any depth."""
    own = path.split("/")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [own if node.level else node.module or own]
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [own if node.args[0].value.startswith(".") else node.args[0].value]
        found += [Import(path, node.lineno, name.split(".")[0]) for name in names]
    return found


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO_ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _all_imports() -> dict[str, list[Import]]:
    """Repository-relative module path → its imports, for every checked module."""
    result = {}
    for package in PACKAGES:
        for module in _modules(package):
            path = module.relative_to(REPO_ROOT).as_posix()
            result[path] = imports_in(module.read_text(encoding="utf-8"), path)
    return result


ALL_IMPORTS = _all_imports()


def test_every_checked_package_has_modules() -> None:
    for package in PACKAGES:
        assert any(path.startswith(f"{package}/") for path in ALL_IMPORTS), package
    assert CLI_ENTRY_POINT in ALL_IMPORTS


@pytest.mark.parametrize("package", PACKAGES)
def test_package_never_imports_what_it_must_not(package: str) -> None:
    violations = [
        str(imp)
        for path, imports in ALL_IMPORTS.items()
        if path.startswith(f"{package}/")
        for imp in imports
        if imp.target in (CLI_FORBIDDEN if path == CLI_ENTRY_POINT else FORBIDDEN[package])
    ]
    assert not violations, "\n".join(violations)


def package_graph(all_imports: dict[str, list[Import]]) -> dict[str, set[str]]:
    """Top-level package → the other checked packages it imports (the CLI entry point left out)."""
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for path, imports in all_imports.items():
        if path == CLI_ENTRY_POINT:
            continue
        source = path.split("/")[0]
        graph[source] |= {i.target for i in imports if i.target in graph and i.target != source}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, str] = {}  # "active" while on the DFS stack, then "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "active"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "active":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_packages() -> None:
    graph = package_graph(ALL_IMPORTS)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])
    # The layering this enforces, from the bottom: shapes_world and service, export, evaluation.
    assert graph["shapes_world"] == set()
    assert graph["service"] == set()


def test_import_collector_sees_every_kind_of_import() -> None:
    source = """
import numpy as np, torch.nn
from service.contrastive import rules
from . import sibling
from .inner import thing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from evaluation.evaluate import REWARDS

def command():
    import export.verify
    from shapes_world import vocab
    return importlib.import_module("transformers.models"), __import__("onnx")
"""
    targets = [(i.line, i.target) for i in imports_in(source, "service/example.py")]
    assert sorted(targets) == [
        (2, "numpy"),
        (2, "torch"),
        (3, "service"),
        (4, "service"),
        (5, "service"),
        (6, "typing"),
        (8, "evaluation"),
        (11, "export"),
        (12, "shapes_world"),
        (13, "onnx"),
        (13, "transformers"),
    ]


def test_cycle_finder() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
