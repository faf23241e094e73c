"""Where a deployed ONNX file runs: ONNX Runtime, or OpenVINO reading the same file (the
``openvino`` extra), and which one runs it fastest, found by timing them side by side.

A runtime name is a runtime with pinned settings (see :mod:`mcp.evaluation.ort_bench`):
``onnxruntime``, ``openvino`` (f32 inference, the file's own arithmetic) and
``openvino-bf16`` (bfloat16 inference, offered only where the CPU has bfloat16
instructions). ``auto`` means every installed runtime, timed on the file, the fastest kept
when it passes its parity check. Knows nothing of MLflow."""

from __future__ import annotations

import functools
import importlib.util
from importlib.metadata import version
from pathlib import Path
from typing import Mapping, Sequence

from mcp.deploy.onnx import ort_session
from mcp.errors import ConfigError
from mcp.evaluation import ort_bench  # its compare is called through the module: tests fake it
from mcp.evaluation.ort_bench import RUNTIMES, OpenVinoSession

CHOICES = (*RUNTIMES, "auto")
INSTALL = {"openvino": "pip install 'mcp-pipeline[openvino]'", "openvino-bf16": "pip install 'mcp-pipeline[openvino]'"}
EXACT = ("onnxruntime", "openvino")  # float32 arithmetic as stored: float files must match PyTorch's logits


def installed(runtime: str) -> bool:
    package = "onnxruntime" if runtime == "onnxruntime" else "openvino"
    return importlib.util.find_spec(package) is not None


@functools.lru_cache(maxsize=1)
def _bf16_cpu() -> bool:
    """Whether OpenVINO's CPU plugin computes in bfloat16 here (its default precision is
    bf16 exactly there)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def available() -> list[str]:
    """The runtimes this machine runs: installed, and bf16 only on a CPU with bfloat16."""
    return [r for r in RUNTIMES if installed(r) and (r != "openvino-bf16" or _bf16_cpu())]


def check_choice(option: str, value: str, many: bool = False) -> None:
    """One-line refusal of a runtime option's value (an unknown name, or a runtime that is
    not installed). ``many``: a comma-separated list, or ``all``, is allowed too."""
    names = [v.strip() for v in value.split(",")] if many else [value]
    allowed = [*CHOICES, "all"] if many else list(CHOICES)
    for name in names:
        if name not in allowed:
            raise ConfigError(f"{option}={value!r}: {name!r} is not a runtime; allowed: {', '.join(allowed)}"
                           + (" (or a comma-separated list)" if many else ""))
        if name in RUNTIMES and not installed(name):
            raise ConfigError(f"{option}={value!r}: runtime {name} is not installed here ({INSTALL[name]})")
        if name == "openvino-bf16" and not _bf16_cpu():
            raise ConfigError(f"{option}={value!r}: this CPU has no bfloat16 instructions; allowed here: "
                           f"{', '.join(available())}, auto")


def candidates(value: str) -> list[str]:
    """The runtimes a (checked) option value names, in a fixed order: ``auto`` and ``all``
    are every available one."""
    names = [v.strip() for v in value.split(",")]
    if "auto" in names or "all" in names:
        return available()
    return [r for r in RUNTIMES if r in names]


def session(path: str | Path, runtime: str = "onnxruntime", threads: int = 0, device: str = "cpu"):
    """A session of ``path`` in ``runtime`` for accuracy and parity (ONNX Runtime's
    session itself, or an :class:`OpenVinoSession`, both read by
    :func:`mcp.deploy.onnx.ort_predict`)."""
    if runtime == "onnxruntime":
        return ort_session(path, device, threads)
    return OpenVinoSession(str(path), runtime, threads)


def settings(runtime: str, threads: int = 1) -> str:
    """How a runtime runs a file, as a version's tag says it: enough to run it the same way."""
    if runtime == "onnxruntime":
        return f"onnxruntime CPUExecutionProvider, intra_op_num_threads={threads}, inter_op_num_threads=1, sequential"
    precision = "bf16" if runtime == "openvino-bf16" else "f32"
    return (f"openvino CPU, PERFORMANCE_HINT=LATENCY, NUM_STREAMS=1, INFERENCE_NUM_THREADS={threads}, "
            f"INFERENCE_PRECISION_HINT={precision}")


def versions() -> dict[str, str]:
    """The version of every installed runtime, as ``<package>_version``."""
    return {f"{package}_version": version(package) for package in ("onnxruntime", "openvino")
            if importlib.util.find_spec(package) is not None}


def fastest(path: str | Path, shape: Sequence[int], seconds: float, threads: int = 1,
            names: Sequence[str] | None = None) -> tuple[str, dict[str, float]]:
    """(the runtime that runs ``path`` fastest, the p50 of each), the available runtimes
    (or ``names``) timed side by side: what ``auto`` means."""
    return fastest_of({name: path for name in names or available()}, shape, seconds, threads)


def fastest_of(files: Mapping[str, str | Path], shape: Sequence[int], seconds: float, threads: int = 1
               ) -> tuple[str, dict[str, float]]:
    """(the fastest runtime, the p50 of each) of ``runtime -> the file built for it`` (a
    deployable whose INT8 layers were chosen on that runtime), timed side by side, each
    file in its own runtime."""
    names = list(files)
    times = dict(zip(names, ort_bench.compare([str(files[n]) for n in names], tuple(shape), threads, seconds,
                                              runtimes=names)))
    return min(times, key=times.get), times


def latency_metrics(times: dict[str, float], prefix: str = "latency_ms_p50_cpu_") -> dict[str, float]:
    """Each runtime's p50 as a metric, ``<prefix><runtime>`` (MLflow keys: ``-`` -> ``_``)."""
    return {prefix + name.replace("-", "_"): ms for name, ms in times.items()}
