"""What a search shows while the user waits: a progress bar on a terminal, one line per
finished trial in a log file or a scheduler's output (a bar there would print nothing until
the end), nothing when told to be quiet."""

from __future__ import annotations

import sys
import time
from typing import Any

from mcp.tuner.study import SIZE_KEY


def lines_mode(show: bool | None) -> bool:
    """``show=None`` decides by where stderr goes: a terminal gets a bar, anything else lines."""
    isatty = getattr(sys.stderr, "isatty", None)
    return show is None and not (isatty is not None and isatty())


class TrialProgress:
    """Reports each finished trial of a study of ``total`` trials: its state, validation
    accuracy, size (and latency) against the budget, and the best feasible trial so far."""

    def __init__(self, name: str, total: int, done: int, budget: float | None, budget_on: str, budget_ms: float = 0.0,
                 latency_key: str = "latency_ms_p50_cpu", show: bool | None = None):
        from tqdm.auto import tqdm

        self.name, self.total, self.budget, self.budget_on = name, total, budget, budget_on
        self.budget_ms, self.latency_key = budget_ms, latency_key
        self.lines = lines_mode(show)
        self.started = time.perf_counter()
        self.best: tuple[float, int] | None = None
        self.bar = None if self.lines or show is False else tqdm(
            total=total, initial=min(done, total), desc=f"search {name}", unit="trial", dynamic_ncols=True)
        self.quiet = show is False

    def trial(self, trial: Any, done: int) -> None:
        """``trial``: Optuna's FrozenTrial once told; ``done``: the study's finished trials."""
        attrs = trial.user_attrs
        state = attrs.get("state") or trial.state.name.lower()
        accuracy = trial.values[0] if trial.values else None
        feasible = attrs.get("budget_excess", 1.0 if self.budget else -1.0) <= 0 and attrs.get("latency_excess", 0) <= 0
        if state == "complete" and feasible and accuracy is not None and (self.best is None or accuracy > self.best[0]):
            self.best = (accuracy, trial.number)
        if self.quiet:
            return
        best = f"best {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "no feasible trial yet"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(best)
            return
        parts = [f"trial {trial.number} {state}"]
        if accuracy is not None:
            parts.append(f"val_accuracy {accuracy:.4f}")
        size = attrs.get(SIZE_KEY[self.budget_on])
        if size is not None:
            parts.append(f"{size:,.0f} B" + (f" of the {self.budget:,.0f} B budget" if self.budget else ""))
        latency = attrs.get(self.latency_key)
        if latency is not None and self.budget_ms:
            parts.append(f"{latency:.4f} ms of the {self.budget_ms:g} ms budget")
        print(f"search {self.name}: {min(done, self.total)}/{self.total} trials, {', '.join(parts)}; {best} "
              f"({time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
