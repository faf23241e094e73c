"""Export to ONNX and run in ONNX Runtime.

Export uses torch's TorchScript-based exporter (``dynamo=False``): it needs no extra
package and folds BatchNorm into the preceding convolution in eval mode. The batch
dimension is dynamic.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mcp.errors import McpError

INPUT, OUTPUT = "input", "logits"
DEFAULT_OPSET = 17


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (a CPU copy, eval mode) as ONNX with a dynamic batch dimension."""
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          do_constant_folding=True)
    return path


def ort_session(path: str | Path, device: str = "cpu", threads: int = 0):
    """An ONNX Runtime session (CUDA execution provider first when asked and present)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def ort_predict(session, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits of a batch, in ONNX Runtime or in another runtime's session (one with
    ``predict``: :class:`mcp.evaluation.ort_bench.OpenVinoSession`)."""
    arr = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if hasattr(session, "predict"):
        return session.predict(arr)
    return session.run([OUTPUT], {INPUT: arr})[0]


def ort_evaluate(session, batches: Iterable) -> dict[str, float]:
    """Accuracy and mean cross-entropy of an ONNX model over (x, y) batches."""
    correct, total, loss = 0, 0, 0.0
    for x, y in batches:
        logits = torch.from_numpy(ort_predict(session, x))
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1)}


def check_onnx(path: str | Path) -> None:
    """ONNX's checker (full check, shapes included); a failure is a one-line McpError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker errors come in several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise McpError(f"ONNX checker rejected {Path(path).name}: {first[:300]}") from None


def node_count(path: str | Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def optimize_onnx(path: str | Path, out_path: str | Path) -> Path:
    """ONNX Runtime's basic offline graph optimisations (constant folding, redundant node
    elimination): the level whose output stays portable across execution providers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(out_path)


@torch.no_grad()
def parity(model: nn.Module, session, x: torch.Tensor) -> dict[str, float]:
    """PyTorch (CPU, eval) against ONNX Runtime on one fixed batch: the largest absolute
    difference of the logits, and the share of equal predictions."""
    reference = copy.deepcopy(model).cpu().eval()(x.cpu()).numpy()
    got = ort_predict(session, x)
    return {"max_abs_diff": float(np.max(np.abs(reference - got))),
            "agreement": float(np.mean(reference.argmax(1) == got.argmax(1)))}
