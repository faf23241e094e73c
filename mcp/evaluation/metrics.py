"""Model metrics under the glossary names every stage logs them by (``params_total``,
``params_nonzero``, ``sparsity``, ``macs``, ``size_bytes_fp32``, the latencies, ...)."""

from __future__ import annotations

import copy
import resource
import sys
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mcp.quantization.codec import dense_size


def count_params(model: nn.Module) -> dict[str, float]:
    """params_total, params_nonzero, sparsity (over all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return {
        "params_total": float(total),
        "params_nonzero": float(nonzero),
        "sparsity": 1.0 - nonzero / total if total else 0.0,
    }


def size_bytes_fp32(model: nn.Module) -> int:
    """Dense float32 size of everything inference needs: every floating-point tensor of
    the state (weights, biases and BatchNorm running statistics; 4 bytes each, zeros
    included) in the payload container that ``size_bytes_compressed`` measures, so the
    two count the same tensors and a float model never encodes larger than this."""
    return dense_size(model)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


def measure_latency(model: nn.Module, input_shape: Sequence[int], device: str = "cpu",
                    batch_size: int = 1, warmup: int = 10, iters: int = 50) -> dict[str, float]:
    """p50/p95 latency (ms) at ``batch_size`` after warm-up, and throughput (images/s).

    The model is copied to ``device`` in eval mode; the caller's model is untouched.
    """
    m = copy.deepcopy(model).to(device).eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            m(x)
        sync()
        for _ in range(iters):
            t0 = time.perf_counter()
            m(x)
            sync()
            times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "throughput": float(batch_size * 1000.0 / ms.mean()),
    }


def latency_metrics(model: nn.Module, input_shape: Sequence[int], device: str = "cpu",
                    throughput_batch: int = 64) -> dict[str, float]:
    """PyTorch's latency and throughput for one device kind ('cpu' or 'cuda' -> suffix
    _gpu), named ``torch_*``: the glossary's ``latency_ms_*`` is the deployed ONNX model's."""
    suffix = "gpu" if device.startswith("cuda") else "cpu"
    single = measure_latency(model, input_shape, device, batch_size=1)
    batched = measure_latency(model, input_shape, device, batch_size=throughput_batch, warmup=3, iters=10)
    return {
        f"torch_latency_ms_p50_{suffix}": single["p50"],
        f"torch_latency_ms_p95_{suffix}": single["p95"],
        f"torch_throughput_ips_{suffix}": batched["throughput"],
    }


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak memory of this process: CUDA's max allocated on a GPU, else peak RSS."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


def model_metrics(model: nn.Module, input_shape: Sequence[int], device: str) -> dict[str, float]:
    """Glossary metrics of a model's shape, size and speed: params (total, non-zero),
    sparsity, MACs, ``size_bytes_fp32``, PyTorch's CPU latency and throughput (and the GPU
    ones on CUDA). Accuracy is measured by the caller, on the split it chooses."""
    metrics: dict[str, float] = dict(count_params(model))
    metrics["macs"] = float(count_macs(model, input_shape))
    metrics["size_bytes_fp32"] = float(size_bytes_fp32(model))
    metrics.update(latency_metrics(model, input_shape, "cpu"))
    if device == "cuda":
        metrics.update(latency_metrics(model, input_shape, "cuda"))
    return metrics
