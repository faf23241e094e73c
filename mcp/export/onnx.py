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
    """Logits of a batch."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return session.run([OUTPUT], {INPUT: np.ascontiguousarray(arr, dtype=np.float32)})[0]


def ort_evaluate(session, batches: Iterable) -> dict[str, float]:
    """Accuracy and mean cross-entropy of an ONNX model over (x, y) batches."""
    correct, total, loss = 0, 0, 0.0
    for x, y in batches:
        logits = torch.from_numpy(ort_predict(session, x))
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1)}
