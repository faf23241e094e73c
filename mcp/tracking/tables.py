"""Tables and plots as run artifacts: CSV files and matplotlib PNGs under ``plots/``."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mcp.evaluation.plots import plot_study
from mcp.tracking.runs import log_artifact, log_metrics
from mcp.tuner.objective import STATES, write_trials_csv


def log_csv(name: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Log ``rows`` under ``header`` as the CSV artifact ``name`` of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(list(header))
            writer.writerows(rows)
        log_artifact(path)


def log_plot(plot: Callable[..., Path], filename: str, *args: Any, **kwargs: Any) -> None:
    """Draw with ``plot(..., path=...)`` into a temporary PNG and log it under ``plots/``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        plot(*args, path=path, **kwargs)
        log_artifact(path, "plots")


def log_study(study, trials: Sequence[dict[str, Any]], winners: Sequence[dict[str, Any]], pareto: bool,
              size_key: str, latency: bool = False) -> None:
    """What a search run logs of its study: the trials' counts by state, its best winner's
    figures, ``trials.csv`` and Optuna's plots under ``plots/``."""
    counts = {s: sum(t["state"] == s for t in trials) for s in STATES}
    log_metrics({f"trials_{k}": float(v) for k, v in counts.items()} | {"trials_total": float(len(trials))})
    if winners:
        log_metrics({f"best_{k}": float(winners[0][k]) for k in (
            "test_accuracy", "size_bytes_compressed", "size_bytes_onnx", "compression_ratio",
            "compression_ratio_vs_baseline", "accuracy_drop", "accuracy_drop_vs_baseline")})
    with tempfile.TemporaryDirectory() as tmp:
        log_artifact(write_trials_csv(list(trials), Path(tmp) / "trials.csv"))
        for path in plot_study(study, tmp, pareto, size_key, latency):
            log_artifact(path, "plots")
