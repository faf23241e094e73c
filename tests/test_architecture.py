"""The layout's rules, checked on the source: stages compose only through run_*, the core
knows nothing of MLflow or the stages, and no module imports a module that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "mcp"
CORE = ("data", "models", "training", "pruning", "quantization", "distillation", "tuner", "deploy", "evaluation")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


FILES = sorted(PACKAGE.rglob("*.py"))


def test_a_stage_uses_another_stage_only_through_its_run_function():
    for path in (PACKAGE / "stages").glob("*.py"):
        me = _module(path)
        for module, names in _imports(path):
            if not module.startswith("mcp.stages.") or module == me:
                continue
            if path.name == "common.py":
                pytest.fail(f"{me} imports the stage {module}: the shared helpers import no stage")
            if module != "mcp.stages.common":
                bad = [n for n in names if not n.startswith("run_")]
                assert not bad, f"{me} imports {bad} from {module}: only its run_* functions"


@pytest.mark.parametrize("package", CORE)
def test_the_core_knows_nothing_of_mlflow_or_the_stages(package):
    for path in (PACKAGE / package).rglob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("mlflow", "mcp.stages", "mcp.tracking", "mcp.cli")), (
                f"{_module(path)} imports {module}")


def test_no_import_cycles():
    """Module-level imports only: a lazy import inside a function is how a cycle is broken."""
    graph: dict[str, set[str]] = {}
    names = {_module(p) for p in FILES}
    for path in FILES:
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mcp"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                edges.update(t for t in targets if t in names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in names)
        graph[_module(path)] = edges - {_module(path)}

    def parents(m: str) -> set[str]:  # importing a.b.c runs a and a.b first
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n in parents(m) or m in parents(n):
                continue  # a package and its own modules: Python's partial-init rule, not a cycle
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
