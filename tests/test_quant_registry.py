"""Quantization methods come from one registry: the CLI's choices, validation, the engine,
the deployable ONNX model and the table on the docs' quantization page. A new method is one new module."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

from conftest import PYTHON, ROOT


def test_cli_choices_config_and_docs_come_from_the_registry():
    import click

    from mcp.cli import main
    from mcp.config import FINE_TUNED_METHODS, QUANT_METHODS
    from mcp.quantization.methods import markdown_table, quant_method, quant_method_names

    assert QUANT_METHODS == quant_method_names()
    assert set(FINE_TUNED_METHODS) == {m for m in QUANT_METHODS if quant_method(m).fine_tunes}
    option = next(p for p in main.commands["quantize"].params if p.name == "method")
    assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == quant_method_names()
    pipeline = next(p for p in main.commands["pipeline"].params if p.name == "quantize_method")
    assert tuple(pipeline.type.choices) == quant_method_names()
    assert markdown_table() in (ROOT / "docs" / "commands" / "quantization.md").read_text()


def test_a_new_method_is_one_module(tmp_path):
    """Drop one module into mcp/quantization/methods/: `mcp quantize --method` takes it,
    runs it end to end and tags the run with it; nothing else changes. (In a copy of the
    package, which the subprocess imports first: tests running beside this one in other
    processes must not see the new module come and go.)"""
    shutil.copytree(ROOT / "mcp", tmp_path / "mcp", ignore=shutil.ignore_patterns("__pycache__"))
    module = tmp_path / "mcp" / "quantization" / "methods" / "zz_test_grid8.py"
    module.write_text(textwrap.dedent('''
        from mcp.quantization.methods import QuantMethod, register_quant_method

        register_quant_method(QuantMethod(name="zz_test_grid8", summary="test", deployed_as="test",
                                          deploy="grid_int8"))
    '''))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    for key in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    data = ["--dataset", "synthetic", "--input-shape", "1x8x8", "--num-classes", "4"]
    script = textwrap.dedent(f"""
        import mcp
        print("package at", mcp.__file__)
        from mcp.cli import main
        main(["import", "--model", "tiny_mlp", *{data!r}], standalone_mode=False)  # a baseline, untrained
        main(["quantize", "--method", "zz_test_grid8", "--bits", "6", "--model-uri",
              "models:/tiny_mlp-synthetic@baseline", "--register", "false", *{data!r}], standalone_mode=False)
    """)
    proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"package at {tmp_path / 'mcp' / '__init__.py'}" in proc.stdout  # the copy
    assert "zz_test_grid8" in proc.stdout and "deployed as onnx_int8_weights" in proc.stdout
