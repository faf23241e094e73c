"""The layout's rules, checked on the source: stages compose only through run_*, the core
knows nothing of MLflow or the stages, and no module imports a module that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import imports_graph
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


def test_no_import_cycles_counting_imports_inside_functions():
    """Every import counts, at module level or inside a function: an import inside a function
    hides a cycle from the reader, it does not remove it (a package importing its own
    modules aside; the lazy public face of ``mcp/__init__.py`` imports nothing by statement)."""
    assert imports_graph.cycles(imports_graph.build(ROOT)) == []


LIGHT = ("mcp", "mcp.cli", "mcp.config")  # what `mcp --help` and an option error load: no torch, no MLflow


def test_imports_inside_functions_only_defer_a_heavy_package():
    """An import of an mcp module inside a function is there to defer a heavy third-party
    import (torch, MLflow, ONNX Runtime, ...) that the importing module does not load, and
    only in the modules that must start light, which say so in their docstrings."""
    graph = imports_graph.build(ROOT)
    needless = imports_graph.needless_deferrals(graph)
    assert not needless, "imports inside functions that defer nothing heavy: " + ", ".join(
        f"{i.module}:{i.line} ({i.function})" for i in needless)
    deferring = {i.module for i in graph.imports if i.function}
    assert deferring <= set(LIGHT), f"only {LIGHT} defer imports; also: {sorted(deferring - set(LIGHT))}"
    for module in deferring:
        assert "torch" in ast.get_docstring(ast.parse(graph.modules[module].read_text())), module
    for module in LIGHT:
        assert not {"torch", "mlflow"} & graph.heavy(module), module


def test_mcp_help_loads_neither_torch_nor_mlflow():
    import subprocess

    from conftest import PYTHON

    code = "import sys, mcp.cli; print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
