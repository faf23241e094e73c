"""Latency, throughput and peak memory of one ONNX model in one runtime (ONNX Runtime, or
OpenVINO reading the same file), measured in a process of its own (it imports the runtime
and numpy only, so its peak RSS is the inference process's, not the benchmark's).

    python -m mcp.evaluation.ort_bench model.onnx --shape 1x8x8 --device cpu --threads 1 --runtime openvino

prints one JSON object: p50_ms, p95_ms (batch 1), throughput_ips and batch_p50_ms (the
median time of one call at --batch), the runtime and its execution provider or device,
the thread count, and peak_rss_mb.

Runtimes (the settings are pinned, and recorded with every figure):

- ``onnxruntime``: the CPU execution provider, sequential execution, ``threads`` intra-op
  threads and one inter-op thread.
- ``openvino``: OpenVINO's CPU plugin, latency hint, one stream, ``threads`` inference
  threads, inference precision f32 (the file's own arithmetic).
- ``openvino-bf16``: the same with inference precision bf16, OpenVINO's default on CPUs
  with bfloat16 instructions: faster there, and lossy like INT8, so its parity is judged
  by accuracy and agreement, not by logits.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


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


RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")
OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}


def _session(path: str, threads: int, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=providers)


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO's CPU plugin, with the settings of its runtime name;
    ``predict`` maps a float32 batch to the first output, as ONNX Runtime's does."""

    def __init__(self, path: str, runtime: str = "openvino", threads: int = 1):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT":
                  OPENVINO_PRECISION[runtime]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.runtime, self.compiled = runtime, ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def predict(self, x):
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data.copy()

    def settings(self) -> dict:
        return {"device": "CPU", "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                "streams": int(self.compiled.get_property("NUM_STREAMS")),
                "precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


def runner(path: str, runtime: str = "onnxruntime", threads: int = 1, providers: list[str] | None = None):
    """(a function running one input batch, the session) of ``path`` in ``runtime``."""
    if runtime == "onnxruntime":
        session = _session(str(path), threads, providers or ["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda x: session.run(None, {name: x})), session
    if runtime not in OPENVINO_PRECISION:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    session = OpenVinoSession(str(path), runtime, threads)
    return session.predict, session


def compare(paths: list[str], shape: tuple[int, ...], threads: int = 1, seconds: float = 0.5,
            rounds: int = 4, runtimes: list[str] | None = None) -> list[float]:
    """p50 (ms, batch 1, CPU) of several models timed side by side (:func:`compare_here`)
    in a process of its own, so that the caller's threads stay out of the timing: in the
    search process that had just fine-tuned its winner, a ResNet-20 timed 0.157 ms in ONNX
    Runtime that a fresh process timed at 0.094 ms (PyTorch's OpenMP workers keep
    spinning after its work)."""
    spec = json.dumps({"paths": [str(p) for p in paths], "shape": list(shape), "threads": threads,
                       "seconds": seconds, "rounds": rounds, "runtimes": runtimes})
    proc = subprocess.run([sys.executable, "-m", "mcp.evaluation.ort_bench", "--compare", spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"timing {', '.join(Path(p).name for p in paths)} failed: {last[:300]}")
    return [float(t) for t in json.loads(proc.stdout.strip().splitlines()[-1])]


def compare_here(paths: list[str], shape: tuple[int, ...], threads: int = 1, seconds: float = 0.5,
                 rounds: int = 4, runtimes: list[str] | None = None) -> list[float]:
    """p50 (ms, batch 1, CPU) of several models timed side by side in this process, each
    for ``seconds`` in all: in ``rounds`` slices, the models visited in rotated order,
    so that a busy moment of the machine does not fall on one model alone. ``runtimes``:
    the runtime of each path (default: ONNX Runtime for all); one file may come twice."""
    import numpy as np

    runners = [runner(str(p), r, threads)[0] for p, r in zip(paths, runtimes or ["onnxruntime"] * len(paths))]
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    for run in runners:
        for _ in range(5):
            run(x)
    times: list[list[float]] = [[] for _ in paths]
    n = len(paths)
    for r in range(rounds):
        for k in [(r + i) % n for i in range(n)]:
            end = time.perf_counter() + seconds / rounds
            while True:
                t0 = time.perf_counter()
                runners[k](x)
                t1 = time.perf_counter()
                times[k].append(t1 - t0)
                if t1 > end and len(times[k]) >= 3 * (r + 1):
                    break
    return [float(np.median(t) * 1000) for t in times]


SETTLED_SPREAD = 0.1  # times whose interquartile range is within 10% of their median have settled
SETTLE_SECONDS = 0.25  # the least a timing lasts before it may stop because its times settled


def spread(times: list[float]) -> float:
    """Interquartile range over median: torch.utils.benchmark's ``adaptive_autorange``
    stops when it falls below its threshold (0.1 by default)."""
    import numpy as np

    q1, q2, q3 = np.percentile(times, [25, 50, 75])
    return float((q3 - q1) / q2) if q2 > 0 else float("inf")


def timed(run, x, runs: int, seconds: float) -> tuple[list[float], float]:
    """(the times of ``run(x)`` in seconds, the seconds spent): at least ``runs`` of them
    and at most ``seconds``, stopping sooner once they have settled (:data:`SETTLED_SPREAD`)
    after :data:`SETTLE_SECONDS`: a small model's p50 is as well known after a quarter of
    a second as after two; a noisy one is timed for all of ``seconds``."""
    times: list[float] = []
    start = time.perf_counter()
    look = max(runs, 8)
    while True:
        t0 = time.perf_counter()
        run(x)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if len(times) < runs:
            continue
        if t1 - start >= seconds:
            break
        if len(times) >= look:  # the spread is checked now and then, not after every run
            look = int(look * 1.25) + 1
            if t1 - start >= min(SETTLE_SECONDS, seconds) and spread(times) <= SETTLED_SPREAD:
                break
    return times, time.perf_counter() - start


def measure(path: str, shape: tuple[int, ...], device: str = "cpu", threads: int = 1, batch: int = 64,
            warmup: int = 20, iters: int = 200, seconds: float = 2.0, runtime: str = "onnxruntime") -> dict:
    """Batch 1: at least ``iters`` timed runs, for at most ``seconds`` (:func:`timed`:
    sooner when the times settle); then the same at ``batch`` for throughput (at least 5
    runs)."""
    import numpy as np

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        import onnxruntime as ort

        if runtime != "onnxruntime":
            raise RuntimeError(f"runtime {runtime} runs on the CPU here; on a GPU use onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("CUDAExecutionProvider is not available (install the gpu extra: onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    run, session = runner(path, runtime, threads, providers)
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, *shape), dtype=np.float32)
    many = rng.standard_normal((batch, *shape), dtype=np.float32)
    for _ in range(warmup):
        run(one)
    times, spent = timed(run, one, iters, seconds)
    for _ in range(max(2, warmup // 5)):
        run(many)
    batch_times, elapsed = timed(run, many, 5, seconds)
    ms = np.asarray(times) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "batch_p50_ms": float(np.median(batch_times) * 1000.0),
            "throughput_ips": batch * len(batch_times) / elapsed, "timed_runs": len(times),
            "timed_seconds": round(spent, 3), "timed_batches": len(batch_times),
            "spread": round(spread(times), 4),
            "runtime": runtime, "provider": session.get_providers()[0] if runtime == "onnxruntime"
            else "OpenVINO CPU " + session.settings()["precision"],
            "threads": threads, "batch": batch, "peak_rss_mb": _peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--shape", help="CxHxW of one input (required)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    parser.add_argument("--compare", help=argparse.SUPPRESS)  # compare()'s own process: its arguments as JSON
    args = parser.parse_args(argv)
    if args.compare:
        spec = json.loads(args.compare)
        print(json.dumps(compare_here(spec["paths"], tuple(spec["shape"]), spec["threads"], spec["seconds"],
                                      spec["rounds"], spec["runtimes"])))
        return
    if not args.model or not args.shape:
        parser.error("the model's ONNX file and --shape are required")
    shape = tuple(int(s) for s in args.shape.split("x"))
    print(json.dumps(measure(args.model, shape, args.device, args.threads, args.batch, args.warmup, args.iters,
                             args.seconds, args.runtime)))


if __name__ == "__main__":
    main()
