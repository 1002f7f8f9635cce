"""The package's shape: the core stands alone, developer tools stay out of the package, and
no module imports one that imports it back (in `dispatcher/`, `devtools/`, `sim/`, `bench/`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dispatcher", "devtools", "sim", "bench")


def _modules(roots: tuple[str, ...]) -> dict[str, Path]:
    modules = {}
    for root in roots:
        for path in (ROOT / root).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(roots: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules it imports at run time (anywhere in it: deferred imports count;
    imports only for type checkers do not)."""
    modules = _modules(roots)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                found = _resolve(target, modules)
                if found and found != name and not name.startswith(found + "."):
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_daemon_aws_or_cli() -> None:
    graph = import_graph(("dispatcher",))
    outside = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("dispatcher.core")
        for target in targets
        if target.startswith(("dispatcher.daemon", "dispatcher.aws", "dispatcher.cli"))
    }
    assert outside == set()


def test_the_package_imports_no_developer_tool() -> None:
    graph = import_graph(("dispatcher", "devtools"))
    leaks = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("dispatcher")
        for target in targets
        if target.startswith("devtools")
    }
    assert leaks == set()


def test_importing_every_module_of_the_package_loads_no_developer_tool() -> None:
    names = sorted(name for name in _modules(("dispatcher",)) if not name.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('devtools', 'tqdm', "
        "'sim', 'bench', 'tests', 'pytest')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout
