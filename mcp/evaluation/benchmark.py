"""Benchmark tables: measuring an ONNX model in a process of its own, the Pareto front,
and the markdown table (GPU columns say "not available" where there is no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from mcp.errors import McpError

NOT_AVAILABLE = "not available"


def measure_onnx(path: str | Path, input_shape: Sequence[int], device: str = "cpu", threads: int = 1,
                 batch: int = 64, warmup: int = 20, iters: int = 200, seconds: float = 2.0,
                 runtime: str = "onnxruntime") -> dict[str, Any]:
    """Run :mod:`mcp.evaluation.ort_bench` on ``path`` in a fresh process; its JSON."""
    cmd = [sys.executable, "-m", "mcp.evaluation.ort_bench", str(path), "--shape", "x".join(map(str, input_shape)),
           "--device", device, "--threads", str(threads), "--batch", str(batch), "--warmup", str(warmup),
           "--iters", str(iters), "--seconds", str(seconds), "--runtime", runtime]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise McpError(f"measuring {Path(path).name} on {device} ({runtime}) failed: {last[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, every coordinate to be minimised:
    nothing else is at most as large in all of them and smaller in one."""
    front = []
    for i, p in enumerate(points):
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """:func:`non_dominated` for (cost to minimise, value to maximise) pairs."""
    return non_dominated([(cost, -value) for cost, value in points])


COLUMNS = (  # (header, key, format); a missing GPU value prints "not available"
    ("model", "label", "{}"), ("format", "deploy_format", "{}"), ("runtime", "runtime", "{}"),
    ("accuracy", "test_accuracy", "{:.2%}"), ("Δ accuracy (points)", "accuracy_delta", "{:+.2f}"),
    ("ONNX (KiB)", "size_kib_onnx", "{:.1f}"), ("size ratio", "size_ratio_onnx", "{:.2f}x"),
    ("compressed (KiB)", "size_kib_compressed", "{:.1f}"),
    ("params (non-zero)", "params_nonzero", "{:,.0f}"), ("MACs", "macs", "{:,.0f}"),
    ("CPU p50 (ms)", "latency_ms_p50_cpu", "{:.3f}"), ("CPU p95 (ms)", "latency_ms_p95_cpu", "{:.3f}"),
    ("CPU throughput (img/s)", "throughput_ips_cpu", "{:,.0f}"), ("speedup p50", "speedup_p50_cpu", "{:.2f}x"),
    ("speedup throughput", "speedup_throughput_cpu", "{:.2f}x"), ("peak memory (MB)", "peak_memory_mb", "{:.0f}"),
    ("PyTorch CPU p50 (ms)", "torch_latency_ms_p50_cpu", "{:.3f}"),
    ("GPU p50 (ms)", "latency_ms_p50_gpu", "{:.3f}"), ("GPU throughput (img/s)", "throughput_ips_gpu", "{:,.0f}"),
    ("PyTorch GPU p50 (ms)", "torch_latency_ms_p50_gpu", "{:.3f}"),
)


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return NOT_AVAILABLE if key.endswith("_gpu") else ""
    if key == "accuracy_delta":
        value = 100 * value
    return fmt.format(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def csv_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = ["uri", *(key for _, key, _ in COLUMNS)]
    return keys, [[_cell(r, k, "{}") if k != "uri" else r["uri"] for k in keys] for r in rows]
