"""The tree's shape: no import cycles among ftloop's modules, and every subpackage installed."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"ftloop": REPO / "ftloop", "ftloop.components": REPO / "components", "ftloop.pipelines": REPO / "pipelines"}


def ftloop_modules() -> dict[str, Path]:
    modules = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ftloop module ``path`` imports, at module level or inside a function (a deferred import still cycles)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = ftloop_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles_among_ftloop_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": set(), "c": set()}
    assert cycles(graph) == []
    graph["b"].add("a")
    assert cycles(graph) == [["a", "b"]]


def test_the_graph_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ftloop.components.records import read_json\n", encoding="utf-8")
    assert imported_modules(module, "ftloop.components.m", {"ftloop.components.records"}) == {"ftloop.components.records"}


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    packages = {name for name, path in ftloop_modules().items() if path.name == "__init__.py"}
    assert packages == listed


def test_stage_modules_are_named_as_their_kfp_tasks():
    """components/stages/<task>.py has run(); kfp_components.<task> calls it."""
    stages = {p.stem for p in (REPO / "components" / "stages").glob("*.py") if p.stem != "__init__"}
    tree = ast.parse((REPO / "components" / "kfp_components.py").read_text(encoding="utf-8"))
    tasks = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert stages == tasks
    for task in tasks:
        source = ast.unparse(next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == task))
        assert f"{task}.run(" in source, task
        stage = ast.parse((REPO / "components" / "stages" / f"{task}.py").read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in stage.body), task
