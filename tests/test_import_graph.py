"""The package's modules import each other without a cycle, counting imports inside functions too.

A cycle (even one hidden in a function-level import) means a class lives in the wrong module: the
schedule's phases must not need the protocol, the protocol builds phases only through
:mod:`virtualpatient.phases`, and so on down to the network math.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "virtualpatient"


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere (module level or in functions), except under TYPE_CHECKING."""
    deps: set[str] = set()

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            guarded = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.ImportFrom) and child.module and not guarded:
                parts = child.module.split(".")
                if parts[0] == "virtualpatient":
                    if len(parts) > 1:
                        deps.add(parts[1])
                    else:
                        deps.update(a.name for a in child.names if (PACKAGE / f"{a.name}.py").exists())
            visit(child, guarded)

    visit(ast.parse(path.read_text()), False)
    return deps - {path.stem}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                walk(dep, path + [dep])
        done.add(node)

    for node in sorted(graph):
        walk(node, [node])
    return found


def test_cycle_finder_finds_a_cycle():
    """The finder itself reports a planted two-module cycle (so an empty result means something)."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]


def test_no_import_cycle_inside_the_package():
    """No module of virtualpatient/ (other than __init__) reaches itself through imports."""
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert {"phases", "protocol", "trial"} <= set(graph)
    assert _cycles(graph) == []
