"""Per-epoch checkpoints: everything needed to resume a run exactly where it stopped."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from mcp.errors import McpError
from mcp.models.foreign import load_weights_only
from mcp.training.loop import Callback, Trainer

FORMAT = "mcp-checkpoint-1"


def save_checkpoint(path: str | Path, trainer: Trainer, extra: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename), so an interrupted save never corrupts the last one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "trainer": trainer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, or fail with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise McpError(f"checkpoint {str(path)!r} does not exist")
    payload = load_weights_only(
        path, pickled=f"checkpoint {str(path)!r} holds pickled Python objects beyond tensors and plain values; "
                      f"refused because unpickling them could run code (mcp checkpoints hold state_dicts)",
        corrupt=f"checkpoint {str(path)!r} is corrupt or not an mcp checkpoint (torch.load failed: {{error}})")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise McpError(f"checkpoint {str(path)!r} is not an mcp checkpoint (expected format {FORMAT!r})")
    return payload


def restore_trainer(trainer: Trainer, payload: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint into a trainer whose model was built from the same recipe."""
    try:
        trainer.load_state_dict(payload["trainer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), first[0] if first else type(exc).__name__)
        raise McpError(f"checkpoint {str(path)!r} does not match the model: {detail[:200]}") from None
    rng = payload.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(rng["python"])


class CheckpointEveryEpoch(Callback):
    def __init__(self, path: str | Path, extra: dict[str, Any]):
        self.path, self.extra = Path(path), extra

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        save_checkpoint(self.path, trainer, self.extra)
