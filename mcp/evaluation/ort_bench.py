"""Latency, throughput and peak memory of one ONNX model in ONNX Runtime, measured in a
process of its own (it imports onnxruntime and numpy only, so its peak RSS is the
inference process's, not the benchmark's).

    python -m mcp.evaluation.ort_bench model.onnx --shape 1x8x8 --device cpu --threads 1

prints one JSON object: p50_ms, p95_ms (batch 1), throughput_ips and batch_p50_ms (the
median time of one call at --batch), the
execution provider used, the thread count, and peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux it is VmHWM, which starts afresh at
    exec; ru_maxrss would also count the parent's memory copied at fork."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _session(path: str, threads: int, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=providers)


def compare(paths: list[str], shape: tuple[int, ...], threads: int = 1, seconds: float = 0.5,
            rounds: int = 4) -> list[float]:
    """p50 (ms, batch 1, CPU) of several models timed side by side in this process, each
    for ``seconds`` in all: in ``rounds`` slices, the models visited in rotated order,
    so that a busy moment of the machine does not fall on one model alone."""
    import numpy as np

    sessions = [_session(str(p), threads, ["CPUExecutionProvider"]) for p in paths]
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds):
        for _ in range(5):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    n = len(paths)
    for r in range(rounds):
        for k in [(r + i) % n for i in range(n)]:
            end = time.perf_counter() + seconds / rounds
            while True:
                t0 = time.perf_counter()
                sessions[k].run(None, feeds[k])
                t1 = time.perf_counter()
                times[k].append(t1 - t0)
                if t1 > end and len(times[k]) >= 3 * (r + 1):
                    break
    return [float(np.median(t) * 1000) for t in times]


def measure(path: str, shape: tuple[int, ...], device: str = "cpu", threads: int = 1, batch: int = 64,
            warmup: int = 20, iters: int = 200, seconds: float = 2.0) -> dict:
    """Batch 1: at least ``iters`` timed runs and at least ``seconds`` of them (short
    runs on a shared machine are noisy); then the same budget at ``batch`` for throughput."""
    import numpy as np
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("CUDAExecutionProvider is not available (install the gpu extra: onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = _session(path, threads, providers)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, *shape), dtype=np.float32)
    many = rng.standard_normal((batch, *shape), dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: one})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, {name: one})
        times.append(time.perf_counter() - t0)
    for _ in range(max(2, warmup // 5)):
        session.run(None, {name: many})
    batch_times: list[float] = []
    t0 = time.perf_counter()
    while len(batch_times) < 5 or time.perf_counter() - t0 < seconds:
        t1 = time.perf_counter()
        session.run(None, {name: many})
        batch_times.append(time.perf_counter() - t1)
    elapsed = time.perf_counter() - t0
    ms = np.asarray(times) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "batch_p50_ms": float(np.median(batch_times) * 1000.0),
            "throughput_ips": batch * len(batch_times) / elapsed, "timed_runs": len(times),
            "provider": session.get_providers()[0],
            "threads": threads, "batch": batch, "peak_rss_mb": _peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--shape", required=True, help="CxHxW of one input")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split("x"))
    print(json.dumps(measure(args.model, shape, args.device, args.threads, args.batch, args.warmup, args.iters,
                             args.seconds)))


if __name__ == "__main__":
    main()
