"""Dependencies in `services/` point one way: no import cycle, counting every import — those
behind `if TYPE_CHECKING` and those inside functions too (a module importing its own package's
`__init__` aside)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_in(name: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """Every module of `modules` that module `name` imports, anywhere in its source."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import submodule` names a module; `from module import name` not.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    # Importing one's own package (its __init__) is how Python loads a submodule: not a cycle.
    return {t for t in found if not name.startswith(t + ".")}


def import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "services").rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {
        module_name(f): imports_in(module_name(f), f.read_text(), f.name == "__init__.py", modules)
        for f in files
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle_hidden_behind_type_checking() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_sees_type_checking_and_function_level_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import hub\n"
        "from services.socket import socketio\n"
        "if TYPE_CHECKING:\n    from services.socket.pod import Pod\n"
        "def f():\n    import services.socket.gateway\n"
    )
    modules = {
        "services.socket",
        "services.socket.hub",
        "services.socket.pod",
        "services.socket.gateway",
        "services.socket.socketio",
        "services.socket.probe",
    }
    found = imports_in("services.socket.probe", source, False, modules)
    assert found == {
        "services.socket.hub",
        "services.socket.pod",
        "services.socket.gateway",
        "services.socket.socketio",
    }


def test_no_import_cycle_in_services() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
