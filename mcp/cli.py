"""The `mcp` command line: one small command per MLproject entry point, no logic.

Options are generated from the stage's config dataclass, so the CLI, config files and
logged params can never disagree. Precedence: defaults < the starting model's recorded data
settings < --config FILE < command line.

Each command imports its stage inside the command: the stages load torch and MLflow, which
`mcp --help`, a mistyped option and the other commands must not wait for.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any, Callable

import click
from click.core import ParameterSource

from mcp.config import (
    BenchmarkConfig,
    DistillConfig,
    ExportConfig,
    ImportConfig,
    PipelineConfig,
    PruneConfig,
    QuantizeConfig,
    SearchConfig,
    SensitivityConfig,
    SplitConfig,
    StageConfig,
    TrainConfig,
    read_config_file,
)
from mcp.errors import McpError

_CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}


class _Choice(click.Choice):
    """A choice whose empty value means "not given": the starting model's, else the default
    (MLproject passes every parameter, the unset ones as '')."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return "" if value == "" else super().convert(value, param, ctx)


def config_options(cls: type[StageConfig]) -> Callable:
    """Decorate a command with ``--config`` plus one option per field of ``cls``."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            choices = f.metadata.get("choices")
            help_text = f.metadata.get("help", "")
            if kind == "bool":
                # `--download` alone means true; `--download false` also works (MLproject passes values).
                fn = click.option(flag, f.name, type=click.BOOL, default=f.default, is_flag=False,
                                  flag_value=True, show_default=True, help=help_text)(fn)
            else:
                ptype = _Choice([c for c in choices if c]) if choices else _CLICK_TYPES[kind]
                bare = f.metadata.get("flag_value")  # the value of the option given alone
                extra = {"is_flag": False, "flag_value": bare} if bare is not None else {}
                fn = click.option(flag, f.name, type=ptype, default=f.default, show_default=True,
                                  help=help_text, **extra)(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                            help="YAML or JSON file with option values (same keys); command-line options win.")(fn)

    return decorate


def explicit_values(ctx: click.Context, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Values from --config, overridden by the options actually typed on the command line."""
    config_file = kwargs.pop("config_file", None)
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    for name, value in kwargs.items():
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            values[name] = value
    return values


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler or `kill`) and Ctrl-C unwind as KeyboardInterrupt, so the open
    runs end KILLED; one that arrives during a write to the tracking store waits for it
    (:func:`mcp.tracking.runs.on_stop_signal`)."""
    runs = sys.modules.get("mcp.tracking.runs")  # not loaded yet: nothing is being written
    if runs is not None:
        runs.on_stop_signal(signum, frame)
        return
    raise KeyboardInterrupt(f"signal {signum}")


class _OneLineErrors(click.Group):
    """Usage errors (an unknown option, a value outside an option's choices) as one
    ``error:`` line with exit code 2, like every other bad input, not click's three-line
    usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # `mcp` alone: the help
                exc.show()
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else "mcp"
            _fail(f"{' '.join(exc.format_message().split())} (see: {command} --help)")
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except OSError as exc:  # the disk is full, a folder is not writable or not a folder: one line, not a traceback
            _fail(" ".join(str(exc).split())[:300] or type(exc).__name__)
        except Exception as exc:  # MLflow refusing the store's settings (an unknown experiment, a bad URI) ...
            # ... or a database that went away under a search (the study's storage, its claims)
            source = {"mlflow": "MLflow", "sqlalchemy": "database", "optuna": "Optuna"}.get(
                type(exc).__module__.split(".")[0])
            if source is None:
                raise
            _fail(f"{source}: {' '.join(str(exc).split())[:300]}")
        if isinstance(code, int) and code:  # ctx.exit(code) returns it without standalone mode
            sys.exit(code)
        return code


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mcp-pipeline")
def main() -> None:
    """mcp: a tracked model compression pipeline (train, prune, quantize, distill, search, export)."""
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)
    # with a tracking server MLflow prints two "View run" links per run (a search makes dozens); mcp prints its own
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    _one_line_warnings()


def console() -> None:
    """The ``mcp`` command and ``python -m mcp``: :func:`main`, then an exit that does not
    walk every object the process made. Once torch, MLflow and ONNX are loaded, Python's
    final garbage collections took 1.3 s of a 5.5 s process here, 0.2 s with the objects
    frozen first (``gc.freeze``: atexit handlers and finalizers still run). Only the
    process's own command: a host that calls :func:`main` in-process keeps collecting."""
    import gc

    try:
        main()
    finally:
        gc.freeze()


def _one_line_warnings() -> None:
    """mcp's own warnings (a model that deploys slower than its start, a layer structured
    pruning leaves alone) print as one line, ``warning: ...``, without a source line."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("mcp."):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def deployed_line(m: dict[str, float], ref: Any = None) -> str:
    """'deployed: CPU p50 0.070 ms in ONNX Runtime (5.58x the baseline's 0.389 ms, 1.42x the parent's ...)';
    the same figure once when the parent is the baseline (``ref``, a :class:`mcp.stages.common.Baseline`),
    as :func:`mcp.stages.common.figures_line` says it."""
    def part(who: str) -> str:
        return f"{m[f'speedup_p50_cpu_vs_{who}']:.2f}x the {who}'s {m[f'{who}_latency_ms_p50_cpu']:.3f} ms"

    parts = [part(who) for who in ("baseline", "parent") if f"{who}_latency_ms_p50_cpu" in m]
    if len(parts) == 2 and ref is not None and ref.is_parent:  # one model, timed once
        parts = [part("parent")] if ref.fallback else [part("baseline") + " (the parent)"]
    return (f"deployed: CPU p50 {m['latency_ms_p50_cpu']:.3f} ms in ONNX Runtime (batch 1, one thread"
            + "".join(f"; {p}" for p in parts) + ")")


def removed_line(m: dict[str, float]) -> str:
    """What pruning removed, named: 'channels removed 50.0%, parameters removed 65.1%;'
    (structured: ``channels_pruned_fraction``, ``pruned_fraction``) or 'weights removed
    90.0%;' (unstructured: ``pruned_fraction``, the weights of the layers in scope)."""
    if "channels_pruned_fraction" in m:
        heads = f"heads removed {100 * m['heads_pruned_fraction']:.1f}%, " if "heads_pruned_fraction" in m else ""
        return (f"channels removed {100 * m['channels_pruned_fraction']:.1f}%, {heads}"
                f"parameters removed {100 * m['pruned_fraction']:.1f}%;")
    return f"weights removed {100 * m['pruned_fraction']:.1f}%;"


def _run_stage(ctx: click.Context, kwargs: dict[str, Any], config_cls: type[StageConfig], run: Any,
               store: bool = True):
    """Build the config from options (and --config), run the stage; user errors exit 2.
    ``store=False``: the command makes no run (the tracking store is opened only to read a
    ``--model-uri``'s recorded data)."""
    try:
        source = kwargs.get("config_file") or "options"
        values = explicit_values(ctx, kwargs)
        given = config_cls.from_dict(values, source=source)  # bad input fails here, before the store is opened
        if not store and not getattr(given, "model_uri", ""):  # nothing to read from the store, nothing to log
            return given, run(given)
        from mcp.tracking.runs import check_tracking_server

        check_tracking_server()  # before the data is loaded: an unreachable server fails in seconds
        from mcp.stages.common import with_recorded_data

        cfg = config_cls.from_dict(with_recorded_data(config_cls, values), source=source)
        return cfg, run(cfg)
    except McpError as exc:
        _fail(str(exc))


@main.command()
@config_options(TrainConfig)
@click.pass_context
def train(ctx: click.Context, **kwargs: Any) -> None:
    """Train a dense baseline; log it to MLflow and register it as <model>-<dataset>@baseline."""
    from mcp.stages.train import checkpoint_config, run_train

    source = kwargs.get("config_file") or "options"
    try:
        values = explicit_values(ctx, kwargs)
        if values.get("resume"):
            values = {**checkpoint_config(values["resume"]), **values}
        cfg = TrainConfig.from_dict(values, source=source)
        result = run_train(cfg)
    except McpError as exc:
        _fail(str(exc))
    m = result.metrics
    click.echo(f"run {result.run_id}: test_accuracy={m['test_accuracy']:.4f} params={int(m['params_total'])} "
               f"macs={int(m['macs'])} deployed_p50_cpu={m['latency_ms_p50_cpu']:.3f} ms "
               f"train_time={m['train_time_s']:.1f} s")
    click.echo(f"model: {result.model_uri}")
    if result.registered_name:
        click.echo(f"registered: models:/{result.registered_name}/{result.registered_version} "
                   f"(alias: models:/{result.registered_name}@baseline)")


@main.command(name="import")
@config_options(ImportConfig)
@click.pass_context
def import_(ctx: click.Context, **kwargs: Any) -> None:
    """Register a model trained elsewhere as the baseline of <name>-<dataset>: a zoo architecture (--model) or your
    own class or factory (--module package.module:factory), with its weights (--weights: a state_dict .pt/.pth, read
    without unpickling code, or .safetensors). Measured on the dataset; every other stage can then start from
    models:/<name>-<dataset>@baseline."""
    from mcp.stages.importer import run_import

    cfg, result = _run_stage(ctx, kwargs, ImportConfig, run_import)
    m = result.metrics
    click.echo(f"run {result.run_id}: test_accuracy={m['test_accuracy']:.4f} params={int(m['params_total'])} "
               f"macs={int(m['macs'])} deployed_p50_cpu={m['latency_ms_p50_cpu']:.3f} ms")
    click.echo(f"tested on {result.test_set}")
    if result.registered_name:
        click.echo(f"registered: models:/{result.registered_name}/{result.registered_version} "
                   f"(alias: models:/{result.registered_name}@baseline)")


@main.command()
@config_options(PruneConfig)
@click.pass_context
def prune(ctx: click.Context, **kwargs: Any) -> None:
    """Prune a trained model (default: <model>-<dataset>@baseline, trained first if missing) on a
    schedule, fine-tune it at a reduced LR, and register it as a new version."""
    from mcp.stages.common import figures_line
    from mcp.stages.prune import comparison_markdown, run_prune

    cfg, result = _run_stage(ctx, kwargs, PruneConfig, run_prune)
    if result.comparison:
        click.echo(comparison_markdown(result.comparison))
        return
    m = result.metrics
    click.echo(f"run {result.run_id}: test_accuracy={m['test_accuracy']:.4f} "
               f"(baseline {m['baseline_test_accuracy']:.4f}, parent {m['parent_test_accuracy']:.4f}) "
               f"{removed_line(m)} params_nonzero={int(m['params_nonzero'])} "
               f"({figures_line(m, result.baseline)}) macs={int(m['macs'])} "
               f"time={m['training_time_s']:.1f} s")
    click.echo(deployed_line(m, result.baseline))
    if result.registered_name:
        click.echo(f"registered: models:/{result.registered_name}/{result.registered_version}")


@main.command()
@config_options(SensitivityConfig)
@click.pass_context
def sensitivity(ctx: click.Context, **kwargs: Any) -> None:
    """Prune each layer alone at a sweep of ratios; log the accuracy drops, gradient norms,
    plots and suggested per-layer ratios (YAML for `mcp prune --ratios-file`)."""
    from mcp.stages.sensitivity import run_sensitivity

    cfg, result = _run_stage(ctx, kwargs, SensitivityConfig, run_sensitivity)
    click.echo(f"run {result.run_id}: suggested ratios for {cfg.target_sparsity:.0%} "
               f"(reached {result.suggested_sparsity:.4f}), artifact suggested_ratios.yaml:")
    for layer, ratio in result.suggested.items():
        click.echo(f"  {layer}: {ratio}")


@main.command()
@config_options(QuantizeConfig)
@click.pass_context
def quantize(ctx: click.Context, **kwargs: Any) -> None:
    """Quantize a trained or pruned model (default: <model>-<dataset>@baseline, trained first if
    missing): INT8 PTQ / dynamic, QAT, fixed point at 2-8 bits, k-means sharing, Huffman coding,
    or the whole Deep Compression pipeline. Measures it in ONNX Runtime, encodes it for its real
    size, and registers it as a new version."""
    from mcp.stages.common import figures_line
    from mcp.stages.quantize import run_quantize

    cfg, result = _run_stage(ctx, kwargs, QuantizeConfig, run_quantize)
    m = result.metrics
    click.echo(f"run {result.run_id}: {cfg.method} test_accuracy torch={m['test_accuracy']:.4f} "
               f"onnx={m['onnx_test_accuracy']:.4f} (baseline {m['baseline_test_accuracy']:.4f}, parent "
               f"{m['parent_test_accuracy']:.4f}) size fp32={int(m['size_bytes_fp32'])} B "
               f"compressed={int(m['size_bytes_compressed'])} B ({figures_line(m, result.baseline)}) "
               f"onnx={int(m['size_bytes_onnx'])} B")
    for stage, size in result.stages.items():
        click.echo(f"  after {stage}: {size} B ({result.stages['fp32'] / size:.1f}x)")
    click.echo(f"deployed as {result.tags['mcp.deploy_format']}: {result.tags['mcp.deploy_note']}")
    click.echo(deployed_line(m, result.baseline))
    if result.registered_name:
        click.echo(f"registered: models:/{result.registered_name}/{result.registered_version}")


@main.command()
@config_options(DistillConfig)
@click.pass_context
def distill(ctx: click.Context, **kwargs: Any) -> None:
    """Train a student (a model name, from scratch; or a model URI, from its weights) on a
    teacher's softened outputs, optionally with a hint loss on intermediate features. The
    teacher is trained first when it is a model name with no registered baseline. The
    student is registered as a new version of <student>-<dataset>, tagged with its teacher."""
    from mcp.stages.common import figures_line
    from mcp.stages.distill import run_distill

    cfg, result = _run_stage(ctx, kwargs, DistillConfig, run_distill)
    m = result.metrics
    click.echo(f"run {result.run_id}: student test_accuracy={m['test_accuracy']:.4f} "
               f"(teacher {m['teacher_test_accuracy']:.4f}, {result.teacher_uri}) params={int(m['params_total'])} "
               f"(float32 size {figures_line(m, result.baseline, parent='teacher')}) "
               f"train_time={m['train_time_s']:.1f} s")
    if result.registered_name:
        click.echo(f"registered: models:/{result.registered_name}/{result.registered_version}")


@main.command()
@config_options(ExportConfig)
@click.pass_context
def export(ctx: click.Context, **kwargs: Any) -> None:
    """Export a registered model to ONNX (a quantized one in the deployable form `mcp quantize`
    built), check it, optimise it, test its parity with PyTorch in ONNX Runtime (failing
    loudly), log it with MLflow's ONNX flavor and register it with the tag format=onnx."""
    from mcp.stages.common import figures_line
    from mcp.stages.export import run_export

    cfg, result = _run_stage(ctx, kwargs, ExportConfig, run_export)
    m = result.metrics
    click.echo(f"run {result.run_id}: {result.source_uri} -> {result.deploy_format}, {int(m['size_bytes_onnx'])} B, "
               f"{int(m['onnx_nodes'])} nodes; parity max |diff| {m['onnx_max_abs_diff']:.2e}, agreement "
               f"{m['onnx_agreement']:.4f}; test accuracy ONNX Runtime {m['onnx_test_accuracy']:.4f} "
               f"(PyTorch {m['test_accuracy']:.4f}); float32 size over the ONNX file's "
               f"{figures_line(m, result.baseline, ratio='compression_ratio_onnx')}")
    if result.registered_name:
        click.echo(f"registered: models:/{result.registered_name}/{result.registered_version} (format=onnx)")


@main.command()
@config_options(BenchmarkConfig)
@click.pass_context
def benchmark(ctx: click.Context, **kwargs: Any) -> None:
    """Measure deployed ONNX models side by side (default: every version of <model>-<dataset>):
    accuracy through ONNX Runtime, latency p50/p95 at batch 1, throughput, peak memory, size,
    params and MACs, on CPU and on GPU where CUDA exists; speedups against a baseline from the
    same run. Prints the table; logs it (markdown, CSV), the trade-off plots and a nested run
    per model to MLflow."""
    from mcp.stages.benchmark import run_benchmark

    cfg, result = _run_stage(ctx, kwargs, BenchmarkConfig, run_benchmark)
    click.echo(result.markdown)
    click.echo(f"run {result.run_id}")


@main.command()
@config_options(SearchConfig)
@click.pass_context
def search(ctx: click.Context, **kwargs: Any) -> None:
    """Optuna search over per-layer prune ratios and bit-widths (--space: a shipped space's name or a
    YAML file) for the best validation accuracy under a size budget, or the accuracy/size Pareto
    front. Every trial is a nested MLflow run; running the same command again resumes the study.
    Winners are rebuilt, tested and registered (the best with alias 'challenger')."""
    from mcp.stages.common import figures_line
    from mcp.stages.search import run_search
    from mcp.tracking import schema

    cfg, result = _run_stage(ctx, kwargs, SearchConfig, run_search)
    states = {}
    for t in result.trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    budget = f"{result.budget_bytes:,.0f} B" if result.budget_bytes else "none"
    click.echo(f"run {result.run_id}: study {result.study_name!r}, {len(result.trials)} trials "
               f"({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}), budget {budget}")
    for w in result.winners:
        where = schema.version_uri(w['registered_name'], w['version']) if w["registered_name"] else w["run_id"]
        click.echo(f"  trial {w['trial']}: test_accuracy={w['test_accuracy']:.4f} size={int(w['size_bytes_compressed'])} "
                   f"B ({figures_line(w, result.baseline)}) {where}{' @' + w['alias'] if w['alias'] else ''}"
                   f"{' (registered by an earlier call)' if w.get('reused') else ''}")
        if not w["within_budget"]:
            click.echo("    over the budget after the final fine-tuning (--final-epochs): not the challenger")
        if w.get("onnx_version"):
            click.echo(f"    ONNX: models:/{w['registered_name']}/{w['onnx_version']} ({int(w['size_bytes_onnx'])} B)")
        if "speedup_p50_cpu" in w:
            click.echo(f"    CPU p50 {w['latency_ms_p50_cpu']:.3f} ms ({w['speedup_p50_cpu']:.2f}x the starting model)")
    if not result.winners:
        click.echo("  no feasible trial finished: loosen the budget or the space, or run more trials")


@main.command()
@config_options(PipelineConfig)
@click.pass_context
def pipeline(ctx: click.Context, **kwargs: Any) -> None:
    """The whole pipeline, each step a nested run (the MLproject's main entry point): the baseline
    (trained when missing), prune, quantize the pruned model, search per-layer ratios and bits under
    the size budget, export to ONNX, benchmark everything, and move 'champion' to the most accurate
    compressed model within the budget."""
    from mcp.stages.pipeline import run_pipeline

    cfg, result = _run_stage(ctx, kwargs, PipelineConfig, run_pipeline)
    click.echo(result.markdown)
    click.echo(f"run {result.run_id}")


@main.command()
@click.argument("name")
@click.option("--version", "version", default=None, help="The version to promote.")
@click.option("--best", is_flag=True, help="The search-registered version with the highest test accuracy "
                                           "(ties: the smaller compressed size, then the newer version).")
def promote(name: str, version: str | None, best: bool) -> None:
    """Move the 'champion' alias of registered model NAME to a version."""
    from mcp.stages.promote import run_promote as move
    from mcp.tracking import schema

    try:
        chosen, previous = move(name, version, best)
    except McpError as exc:
        _fail(str(exc))
    click.echo(f"{schema.alias_uri(name, schema.CHAMPION_ALIAS)} -> version {chosen}"
               + (f" (was {previous})" if previous and previous != chosen else ""))


@main.command()
def models() -> None:
    """List the registered model names."""
    from mcp.models import model_info, model_names

    for name in model_names():
        entry = model_info(name)
        click.echo(f"{name:14s} {'(test) ' if entry.tiny else ''}{entry.description}")


@main.command()
@config_options(SplitConfig)
@click.pass_context
def split(ctx: click.Context, **kwargs: Any) -> None:
    """Write the train/val/test split mcp makes of a dataset (or the one a registered model was made with,
    --model-uri) as a JSON file of sample indices (an image folder's: file paths): train your model outside mcp
    on exactly its train part, then give the file back to `mcp import --split-file`. No run is made."""

    def write(cfg: SplitConfig):
        from mcp.data import write_split
        from mcp.stages.common import load_splits

        splits = load_splits(cfg)
        return splits, write_split(splits, cfg.out)

    cfg, (splits, path) = _run_stage(ctx, kwargs, SplitConfig, write, store=False)
    sizes = ", ".join(f"{part} {len(splits.parts[part]):,}" for part in ("train", "val", "test"))
    click.echo(f"wrote {path}: {sizes} of {splits.pool_size:,} samples of {splits.name} ({splits.how}); "
               f"test set {splits.test_fingerprint}")
    click.echo(f"  entries are {'file paths relative to the data folder' if splits.sample_ids else 'indices'} "
               f"into {splits.order}")


@main.command()
def datasets() -> None:
    """List the dataset names."""
    from mcp.data import dataset_description, dataset_names

    for name in dataset_names():
        click.echo(f"{name:14s} {dataset_description(name)}")


if __name__ == "__main__":
    main()
