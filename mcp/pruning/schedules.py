"""Pruning schedules: pure functions ``(target, steps) -> list of sparsities``, one per
pruning event, ending exactly at ``target``. Where the events fall in training time is
the caller's business (:func:`event_steps`)."""

from __future__ import annotations

from typing import Callable


def one_shot(target: float, steps: int = 1) -> list[float]:
    """Everything at once."""
    return [target]


def iterative(target: float, steps: int) -> list[float]:
    """Prune the same fraction of the remaining weights at each of ``steps`` events
    (Han et al. 2015's iterative pruning): ``1 - (1 - target) ** (k / steps)``."""
    return [1.0 - (1.0 - target) ** (k / steps) for k in range(1, steps + 1)]


def gradual(target: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu and Gupta's (2017) cubic automated gradual pruning from ``initial`` to ``target``:
    ``s_j = s_f + (s_i - s_f) * (1 - j / n) ** 3`` for ``j = 1..n``."""
    return [target + (initial - target) * (1.0 - j / steps) ** 3 for j in range(1, steps + 1)]


SCHEDULES: dict[str, Callable[..., list[float]]] = {
    "one_shot": one_shot, "iterative": iterative, "gradual": gradual,
}


def event_steps(n_events: int, span: int) -> list[int]:
    """Training steps (0-based) at which ``n_events`` evenly spaced events fall within ``span``
    steps; the first is at step 0."""
    return [round(k * span / n_events) for k in range(n_events)]
