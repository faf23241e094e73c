"""Tables and plots as run artifacts: CSV files and matplotlib PNGs under ``plots/``."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mcp.tracking.runs import log_artifact


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
