"""The project's files agree with each other: MLproject <-> CLI, conda.yaml <-> pyproject."""

from __future__ import annotations

import re
import subprocess
import tomllib

import click
import pytest
import yaml

from conftest import PYTHON, ROOT

MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def _command(entry: dict) -> click.Command:
    from mcp.cli import main

    words = entry["command"].split()
    assert words[:3] == ["python", "-m", "mcp"], entry["command"]
    return main.commands[words[3]]


def _same_default(mlproject_default, click_default) -> bool:
    if isinstance(click_default, bool):
        return str(mlproject_default).lower() == str(click_default).lower()
    if isinstance(click_default, (int, float)):
        return float(mlproject_default) == float(click_default)
    return str(mlproject_default) == str(click_default)


def test_every_stage_has_an_entry_point():
    assert set(ENTRY_POINTS) >= {"main", "train", "prune", "quantize", "distill", "export", "search", "benchmark"}
    assert MLPROJECT["conda_env"] == "conda.yaml"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_mlproject_parameters_are_cli_options_with_same_defaults(name):
    entry = ENTRY_POINTS[name]
    command = _command(entry)
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    for param, spec in entry.get("parameters", {}).items():
        assert param in options, f"{name}: parameter {param} is not an option of `mcp {command.name}`"
        assert _same_default(spec["default"], options[param].default), (
            f"{name}: {param} default {spec['default']!r} != CLI default {options[param].default!r}")
        assert spec["type"] in ("string", "float", "path", "uri")
        flag = "--" + param.replace("_", "-")
        assert re.search(rf"{flag} \{{{param}\}}", entry["command"]), f"{name}: {param} not passed as {flag}"
    # and the other way round: every CLI option (but --config, and --experiment: under `mlflow run` the run
    # and its experiment exist before mcp starts, chosen by mlflow run --experiment-name) is reachable from MLproject
    missing = set(options) - set(entry.get("parameters", {})) - {"config_file", "experiment"}
    assert not missing, f"{name}: CLI options missing from MLproject: {sorted(missing)}"


def _normalise(req: str) -> str:
    return req.replace(" ", "").lower()


def test_conda_env_installs_the_pyproject_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {_normalise(d) for d in pyproject["project"]["dependencies"]}
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert {_normalise(d) for d in pip_section} == deps


def test_help_on_every_command():
    from mcp.cli import main

    for name in main.commands:
        out = subprocess.run([PYTHON, "-m", "mcp", name, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "Usage:" in out.stdout
        if name not in ("models", "datasets", "promote"):  # promote: an argument and two options
            assert "--config" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^(python -m pytest[^\n]*)$", readme, re.M)
    assert command, "README has no `python -m pytest ...` line"
    assert command.group(1) in ci


def test_run_outputs_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in ("mlruns/", "mlflow.db", "*.onnx", ".venv/", "/data/", "/checkpoints/"):
        assert entry in ignored


def _github_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_reads_in_minutes_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "README.md is the front page: the details belong in docs/"
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.M | re.S)  # code blocks hold no links
    headings = {_github_slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links
    for target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).exists(), f"README.md links to {target}: no such file"
        else:
            assert anchor in headings, f"README.md links to #{anchor}: no such heading"


def test_nothing_refers_to_a_design_file_that_users_do_not_have():
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", *(ROOT / "docs").rglob("*"), *(ROOT / "mcp").rglob("*.py")]
    texts = {f: f.read_text() for f in files if f.is_file() and f.suffix in (".md", ".py", ".yml", ".yaml")}
    assert ROOT / "README.md" in texts and any(f.parent.name == "docs" for f in texts)
    offenders = sorted(str(f.relative_to(ROOT)) for f, text in texts.items() if "DESIGN.md" in text)
    assert not offenders, f"DESIGN.md is not in the repository, yet these refer to it: {offenders}"


def test_ci_installs_the_built_wheel_and_runs_it_from_an_empty_directory():
    ci = (ROOT / ".ci" / "run").read_text()
    smoke = ROOT / ".ci" / "wheel_smoke.sh"
    assert smoke.is_file() and smoke.stat().st_mode & 0o111, "the wheel smoke script must be executable"
    assert ci.index(".ci/wheel_smoke.sh") > ci.index("python -m pytest -m slow")  # after the tests
    text = smoke.read_text()
    assert "set -euo pipefail" in text and "pip wheel" in text and "mcp pipeline" in text


def test_the_docs_show_the_readme_s_own_model_walkthrough_as_the_readme_does():
    """docs/your-own-model.md repeats the README's walkthrough (CI runs the README's): the same blocks."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own model"):readme.index("\n## ", readme.index("## Your own model") + 1)]
    blocks = re.findall(r"^```\w*\n.*?^```$", section, re.M | re.S)
    assert len(blocks) == 3  # mynet.py, train_mynet.py, the commands
    docs = (ROOT / "docs" / "your-own-model.md").read_text()
    for block in blocks:
        assert block in docs, block.splitlines()[1]
