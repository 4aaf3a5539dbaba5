"""No import cycles among lowrank's modules: the stages form a straight line.

Every `import` statement of every lowrank module is read with `ast`, at module level and inside
functions alike (a function-level import is still a dependency, merely a late one), and the
module graph must be acyclic. The package's `__init__` counts as the module `lowrank`.

Cross-cutting (tests/ mirrors lowrank/ otherwise): a property of the whole package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """lowrank/cli/plan_cmd.py → lowrank.cli.plan_cmd; lowrank/cli/__init__.py → lowrank.cli."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the lowrank modules it imports anywhere in its file."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from . import x` names submodule x where there is one, else the package itself
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:  # `import lowrank.x.y` → the deepest module we have
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None when it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_sees_function_level_and_package_imports(tmp_path):
    """The checker itself: a cycle through a function-level import and `from . import` is found."""
    pkg = tmp_path / "lowrank"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n__version__ = '0'\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g()\n")
    (pkg / "b.py").write_text("from . import __version__\ndef g():\n    return __version__\n")
    graph = import_graph(pkg)
    assert graph == {"lowrank": {"lowrank.a"}, "lowrank.a": {"lowrank.b"}, "lowrank.b": {"lowrank"}}
    assert find_cycle(graph) == ["lowrank", "lowrank.a", "lowrank.b", "lowrank"]
    (pkg / "b.py").write_text("from .version import __version__\n")
    (pkg / "version.py").write_text("__version__ = '0'\n")
    assert find_cycle(import_graph(pkg)) is None


def test_lowrank_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


LEAVES = ("version", "ranks", "fileio", "folder_format", "folder_guard", "model_info", "config_base", "errors")


def test_leaf_modules_import_only_errors():
    """The shared pieces every stage uses import nothing of ours but `errors`."""
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[f"lowrank.{leaf}"] <= {"lowrank.errors"}, (leaf, graph[f"lowrank.{leaf}"])
