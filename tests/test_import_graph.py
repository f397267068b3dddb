"""The package's modules import each other without a cycle, counting imports inside functions too.

A cycle (even one hidden in a function-level import) means a class lives in the wrong module: the
schedule's phases must not need the protocol, the protocol builds phases only through
:mod:`virtualpatient.phases`, and so on down to the network math. Modules are named by their
dotted path inside the package (``network``, ``engine`` for ``engine/__init__.py``,
``engine.batched``), so the subpackage's modules are nodes of the graph like the top level's.
The engine sits below the model: it imports only its own modules and the few model modules it
computes with.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "virtualpatient"

#: What the engine (``virtualpatient/engine/``) may import from outside itself: the network below it
#: and leaf modules that import nothing of the package (``limits`` holds the machine's cache folder).
ENGINE_MAY_IMPORT = {"network", "stabiliser", "errors", "limits"}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name inside it (a subpackage by its own name, for its
    ``__init__``), except the package's own ``__init__`` (its exports load lazily)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path], package: Path = PACKAGE) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (module level or in functions), except
    under TYPE_CHECKING: ``from virtualpatient.a import b`` is module ``a.b`` when that exists, else
    ``a`` (a name from ``a``); relative imports are resolved against ``path``'s package."""
    here = path.relative_to(package).with_suffix("").parts
    own = ".".join(here[:-1])  # the package ``path`` lies in (an ``__init__``'s is its own)
    deps: set[str] = set()

    def inside(dotted: str) -> str | None:
        """``dotted`` (an absolute module name) relative to the package, or None outside it."""
        parts = dotted.split(".")
        return ".".join(parts[1:]) if parts[0] == package.name else None

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            guarded = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if not guarded and isinstance(child, ast.ImportFrom):
                if child.level:
                    base = own.split(".") if own else []
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = inside(child.module or "")
                if name is not None:
                    for alias in child.names:
                        sub = f"{name}.{alias.name}" if name else alias.name
                        if sub in modules:
                            deps.add(sub)
                        elif name:
                            deps.add(name)
            elif not guarded and isinstance(child, ast.Import):
                for alias in child.names:
                    name = inside(alias.name)
                    if name:
                        deps.add(name)
            visit(child, guarded)

    visit(ast.parse(path.read_text()), False)
    me = ".".join(here[:-1]) if here[-1] == "__init__" else ".".join(here)
    return deps - {me}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


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


def test_imports_of_a_subpackage_are_resolved(tmp_path):
    """Absolute and relative imports, of modules and of names, inside and into a subpackage, each
    give the module they load (a planted package, so an empty cycle list means something)."""
    pkg = tmp_path / "virtualpatient"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "top.py": "from virtualpatient.sub import a\nfrom virtualpatient.sub.b import thing\n",
        "sub/__init__.py": "",
        "sub/a.py": "from . import b\nfrom ..top import x\nimport virtualpatient.sub\n",
        "sub/b.py": "from virtualpatient.sub import thing\ndef f():\n    from virtualpatient import top\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = _modules(pkg)
    assert set(modules) == {"top", "sub", "sub.a", "sub.b"}
    graph = {name: _imports(path, modules, pkg) for name, path in modules.items()}
    assert graph == {"top": {"sub.a", "sub.b"}, "sub": set(), "sub.a": {"sub.b", "top", "sub"},
                     "sub.b": {"sub", "top"}}
    assert ["sub.b", "top", "sub.b"] in _cycles(graph)


def test_no_import_cycle_inside_the_package():
    """No module of virtualpatient/ or its subpackages (other than the package's __init__) reaches
    itself through imports."""
    graph = _graph()
    assert {"phases", "protocol", "trial", "network"} <= set(graph)
    assert {"engine", "engine.batched", "engine.hidden", "engine.ops", "engine.native", "engine.settings",
            "engine.adam", "engine.reduction"} <= set(graph)
    assert _cycles(graph) == []


def test_the_engine_imports_nothing_above_the_network():
    """The engine's modules import each other and only network, stabiliser, errors and limits of the
    rest: the model above (patients, phases, trials) uses the engine, never the other way round; and
    limits stays a leaf that imports nothing of the package."""
    graph = _graph()
    assert graph["limits"] == set()
    outside = {name: {d for d in deps if d != "engine" and not d.startswith("engine.")} - ENGINE_MAY_IMPORT
               for name, deps in graph.items() if name == "engine" or name.startswith("engine.")}
    assert outside and all(not deps for deps in outside.values()), outside
    assert not any(d == "engine" or d.startswith("engine.") for d in graph["network"])
