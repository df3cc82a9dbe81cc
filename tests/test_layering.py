"""Imports run one way: a lower room never imports a higher one, not even lazily.

Every ``import`` statement of every module is read with ``ast`` (inside functions and
``TYPE_CHECKING`` blocks too), so an import circle cannot come back unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import executorkit

PACKAGE = Path(executorkit.__file__).parent

# Top to bottom. A module may import its own layer (without a circle) or any lower one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("executorkit", "executorkit.demo", "executorkit.__main__", "executorkit.cli",
     "executorkit.ensemble"),
    ("executorkit.executors",),
    ("executorkit.engine",),
    ("executorkit.launchers",),
    ("executorkit.worker",),
    ("executorkit.export", "executorkit.streaming", "executorkit._progress", "executorkit.retry"),
    ("executorkit.resources",),
    ("executorkit.cache",),
    ("executorkit.transport", "executorkit.scheduler", "executorkit.estimator",
     "executorkit.graph", "executorkit.command"),
    ("executorkit.errors", "executorkit._pickling", "executorkit._sources", "executorkit._syspath",
     "executorkit._version"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The executorkit modules that ``source`` (module ``name``) imports anywhere."""
    found: set[str] = set()
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "executorkit" or m.startswith("executorkit.")}


def layer_of(name: str) -> int:
    best, depth = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in mods.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{src} imports {dst}" for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
            if layer_of(dst) < layer_of(src)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_module_has_a_layer():
    assert [name for name in modules() if layer_of(name) < 0] == []


def test_no_module_imports_a_higher_layer():
    assert upward(import_graph()) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(("name", "source"), [
    ("executorkit.cache._hook", "if TYPE_CHECKING:\n    from executorkit.engine import Engine\n"),
    ("executorkit.export", "def f():\n    from executorkit.executors._base import BaseExecutor\n"),
    ("executorkit.worker.loop", "from ..launchers import local\n"),
    ("executorkit.transport", "def f():\n    import executorkit.errors, executorkit.worker\n"),
])
def test_an_upward_import_is_caught_wherever_it_hides(name, source):
    graph = import_graph()
    graph[name] = imported(source, name, False, set(graph))
    assert len(upward(graph)) == 1


def test_a_circle_is_caught():
    graph = {"executorkit.a": {"executorkit.b"}, "executorkit.b": {"executorkit.a"}}
    assert cycles(graph) == [["executorkit.a", "executorkit.b", "executorkit.a"]]
