"""Calibration batches: the fixed first batches of a split, for data-driven pruning
criteria, activation-range calibration and sensitivity."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def calibration_batches(loader: DataLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of ``loader``'s dataset in its fixed order (no shuffling, so
    every call and every worker calibrates on the same images)."""
    fixed = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False)
    batches = []
    for i, batch in enumerate(fixed):
        if i >= n:
            break
        batches.append(batch)
    return batches
