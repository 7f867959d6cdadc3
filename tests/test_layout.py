"""The package layout: stages import downwards only, configuration depends on nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "node"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every node module `path` imports, at top level or inside a function, resolved to a
    module (`from node.receive import c_store` is node.receive.c_store)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("node")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("node"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = imported_modules(path, modules)
        # importing a module of another package runs that package's __init__ first
        parents = {d.rsplit(".", 1)[0] for d in deps}
        deps |= {p for p in parents if p in modules and not name.startswith(p + ".")}
        graph[name] = deps - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    assert cycle(import_graph()) is None, " -> ".join(cycle(import_graph()) or [])


def test_the_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_configuration_depends_on_nothing_of_the_node_but_its_vocabulary():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("node.config"):
            others = {d for d in deps if not d.startswith(("node.config", "node.vocabulary"))}
            assert not others - {"node"}, f"{name} imports {sorted(others)}"


def test_each_stage_package_says_what_it_does_and_hands_on():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) >= 2, f"{init} needs a two-line docstring"


def readme_layout() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return block.split("\ntools/", 1)[0]  # the node/ part of the tree


def test_the_readme_tree_names_every_module_and_no_other():
    import re

    listed = set(re.findall(r"\b([a-z_0-9]+\.py)\b", readme_layout())) - {"__init__.py"}
    actual = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert listed == actual, f"missing: {sorted(actual - listed)}; gone: {sorted(listed - actual)}"
    packages = set(re.findall(r"\b([a-z_]+)/", readme_layout()))
    assert packages == {p.parent.name for p in PACKAGE.rglob("__init__.py")}
