"""What is deployed, and how: the one owner of the deployable ONNX model of every model mcp
makes (float32, INT8 weights behind DequantizeLinear, QDQ INT8, dynamic INT8), of the
notes that say so, and of what its parity check compares it with. Knows nothing of MLflow:
the stages hand it a quantized model's already-built file when there is one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mcp.data.calibration import calibration_batches
from mcp.deploy import kernel_speed  # its timing is what tests fake: called through the module
from mcp.deploy import runtimes as rt  # called through the module: tests fake what is installed and timed
from mcp.deploy.onnx import check_onnx, export_onnx, node_count, optimize_onnx, ort_evaluate, parity
from mcp.errors import McpError
from mcp.evaluation.metrics import count_macs, count_params, size_bytes_fp32
from mcp.quantization.engine import simulated
from mcp.quantization.onnx_int8 import dynamic_int8 as dynamic
from mcp.quantization.onnx_int8 import static_int8, weight_int8_dq
from mcp.training import evaluate

DEPLOY_NOTES = {
    "onnx_qdq_int8": "INT8 weights and activations (QDQ), run by ONNX Runtime's integer kernels",
    "onnx_dynamic_int8": "INT8 weights of the fully connected layers, activations quantized at run time",
    "onnx_int8_weights": "weights stored as INT8 + DequantizeLinear per channel; compute in float32",
    "onnx_fp32": "float32 weights holding the quantized values",
}
FLOAT_FORMATS = ("onnx_fp32", "onnx_int8_weights")  # float compute: logits must match closely


@dataclass(frozen=True)
class DeployInputs:
    """What a quantization method's deployer gets: the float32 export of the quantized
    model and everything it may need to turn it into the file users deploy."""

    fp32_path: Path
    out: Path
    quantizer: Any  # mcp.quantization.Quantizer, after finish()
    entries: Any  # its encodable weights
    calib: Sequence[Any]  # calibration batches
    spec: Any  # its QuantSpec


def float_file(inputs: DeployInputs) -> tuple[Path, str]:
    """The float32 export as it is (``onnx_fp32``)."""
    inputs.out.write_bytes(inputs.fp32_path.read_bytes())
    return inputs.out, "onnx_fp32"


def grid_int8(inputs: DeployInputs) -> tuple[Path, str]:
    """Weights on uniform grids: INT8 initializers behind DequantizeLinear where they fit."""
    return int8_weights_or_fp32(inputs.fp32_path, inputs.quantizer, inputs.entries, inputs.out)


def qdq_int8(inputs: DeployInputs) -> tuple[Path, str]:
    """ONNX Runtime's static quantization (QDQ), calibrated on the method's batches."""
    spec = inputs.spec
    return (static_int8(inputs.fp32_path, inputs.out, inputs.calib, spec.observer, reduce_range=spec.reduce_range,
                        float_layers=inputs.quantizer.float_layers()), "onnx_qdq_int8")


def dynamic_int8(inputs: DeployInputs) -> tuple[Path, str]:
    """ONNX Runtime's dynamic quantization of the fully connected layers."""
    return dynamic(inputs.fp32_path, inputs.out, reduce_range=inputs.spec.reduce_range), "onnx_dynamic_int8"


DEPLOYERS = {"float": float_file, "grid_int8": grid_int8, "qdq_int8": qdq_int8, "dynamic_int8": dynamic_int8}


def deploy_quantized(method: Any, inputs: DeployInputs) -> tuple[Path, str]:
    """The deployable file of a model quantized by ``method`` (a QuantMethod): its
    deployer by name, or its own callable."""
    deployer = DEPLOYERS[method.deploy] if isinstance(method.deploy, str) else method.deploy
    return deployer(inputs)


def parity_batch(test_loader, n: int) -> torch.Tensor:
    """The first ``n`` test images, in the split's fixed order."""
    xs, count = [], 0
    for x, _ in test_loader:
        xs.append(x)
        count += len(x)
        if count >= n:
            break
    return torch.cat(xs)[:n]


def build_onnx(model: nn.Module, input_shape: Sequence[int], tmp: Path, opset: int = 17, optimize: bool = True,
               deployed: tuple[Path, str] | None = None) -> tuple[Path, str, dict[str, float]]:
    """(ONNX file, deploy format, node counts): ``deployed`` (a quantized model's own
    deployable file and format, as its quantize step built it) when given, else a fresh
    float32 export, optimised where that removes nodes."""
    tmp.mkdir(parents=True, exist_ok=True)
    if deployed is not None:
        path, fmt = deployed
        return path, fmt, {"onnx_nodes": float(node_count(path))}
    path = export_onnx(model, input_shape, tmp / "exported.onnx", opset)
    counts = {"onnx_nodes_exported": float(node_count(path))}
    if optimize:
        optimized = optimize_onnx(path, tmp / "optimized.onnx")
        if node_count(optimized) < counts["onnx_nodes_exported"]:
            path = optimized
    counts["onnx_nodes"] = float(node_count(path))
    return path, "onnx_fp32", counts


def reference_model(model: nn.Module, fmt: str, input_shape: Sequence[int], train_loader) -> nn.Module:
    """What the ONNX model must agree with: the PyTorch model itself, or, where the ONNX
    model quantizes activations too, the PyTorch model with the same activation
    quantization simulated (recalibrated on the quantize stage's calibration batches)."""
    quantization = getattr(model, "mcp_recipe", {}).get("quantization")
    if fmt in FLOAT_FORMATS or not quantization:
        return model
    from torch.utils.data import DataLoader

    loader = DataLoader(train_loader.dataset, batch_size=int(quantization.get("calib_batch_size", 32)))
    batches = calibration_batches(loader, int(quantization.get("calib_batches", 16)))
    return simulated(model, input_shape, quantization, batches)


def int8_weights_or_fp32(fp32_path: Path, quantizer: Any, entries: Mapping[str, Any], out: Path) -> tuple[Path, str]:
    """The deployable form of weights on b-bit uniform grids: INT8 initializers behind
    DequantizeLinear where they fit INT8 (``onnx_int8_weights``), else the float file."""
    ints = quantizer.signed_integers(entries)
    if any(i is not None for i in ints):
        return weight_int8_dq(fp32_path, out, ints), "onnx_int8_weights"
    out.write_bytes(Path(fp32_path).read_bytes())
    return out, "onnx_fp32"


def grid_onnx(model: nn.Module, input_shape: Sequence[int], quantizer: Any, entries: Mapping[str, Any],
              out_dir: str | Path, opset: int = 17) -> tuple[Path, str]:
    """(file, format) of a model whose weights sit on b-bit uniform grids (fixed point,
    QAT, a search trial): exported, then INT8 weights behind DequantizeLinear."""
    out_dir = Path(out_dir)
    fp32 = export_onnx(model, input_shape, out_dir / "fp32.onnx", opset)
    return int8_weights_or_fp32(fp32, quantizer, entries, out_dir / "model.onnx")


def speed_onnx(model: nn.Module, input_shape: Sequence[int], calib: Sequence, out_dir: str | Path,
               opset: int = 17, runtime: str = "onnxruntime") -> tuple[Path, str]:
    """(file, format) of ``model`` deployed for speed on ``runtime``: the float32 export,
    with INT8 (QDQ, calibrated on ``calib``) in the layers that this runtime runs faster
    in INT8 at their shapes on this CPU (:mod:`mcp.deploy.kernel_speed`); ``onnx_fp32``
    when none does."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, input_shape, out_dir / "fp32.onnx", opset)
    speeds = kernel_speed.layer_speeds(fp32, runtime=runtime)
    if not any(s.int8_faster for s in speeds):
        (out_dir / "model.onnx").write_bytes(fp32.read_bytes())
        return out_dir / "model.onnx", "onnx_fp32"
    slow = [i for i, s in enumerate(speeds) if not s.int8_faster]
    return static_int8(fp32, out_dir / "model.onnx", calib, float_layers=slow), "onnx_qdq_int8"


def deploy_note(deploy_format: str, bits: Mapping[str, int], extra: str = "") -> str:
    """The one-line note a run and a version carry on what was deployed: the format's note,
    the bit-widths held in INT8 containers, and the method's own remark."""
    note = DEPLOY_NOTES[deploy_format]
    low = sorted({b for b in bits.values() if b < 8})
    if deploy_format == "onnx_int8_weights" and low:
        note += f"; {','.join(map(str, low))}-bit values in INT8 containers (ONNX Runtime has no kernels below 8 bits)"
    return note + (f"; {extra}" if extra else "")


@dataclass(frozen=True)
class ParityRules:
    """When a deployable agrees with its PyTorch model. A file computed as stored (float
    formats in ONNX Runtime or OpenVINO f32) must match the logits (``atol``) and the
    predictions (``min_agreement``) on the parity batch. A lossy one (INT8 activations, or
    a bf16 runtime) is judged by what a user ships it for: its test accuracy at most
    ``max_accuracy_drop`` below the PyTorch model's, and at least ``lossy_min_agreement``
    of equal predictions."""

    atol: float = 1e-3
    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.005
    lossy_min_agreement: float = 0.95


def is_lossy(fmt: str, runtime: str = "onnxruntime") -> bool:
    return fmt not in FLOAT_FORMATS or runtime not in rt.EXACT


def parity_failure(fmt: str, result: Mapping[str, float], rules: ParityRules, runtime: str = "onnxruntime",
                   accuracy: tuple[float, float] | None = None) -> str | None:
    """Which rule refuses the deployable (None: it passes). ``accuracy``: (deployed,
    PyTorch) test accuracy, needed for a lossy deployable."""
    shown = f"max |PyTorch - {runtime}| = {result['max_abs_diff']:.3g}, agreement {result['agreement']:.4f}"
    if not is_lossy(fmt, runtime):
        if result["max_abs_diff"] > rules.atol:
            return f"{shown}: logits differ by more than atol {rules.atol:g}"
        if result["agreement"] < rules.min_agreement:
            return f"{shown}: predictions agree less than min_agreement {rules.min_agreement:g}"
        return None
    if result["agreement"] < rules.lossy_min_agreement:
        return (f"{shown}: predictions agree less than lossy_min_agreement {rules.lossy_min_agreement:g} "
                f"(the rule for a lossy deployable)")
    if accuracy is not None and accuracy[1] - accuracy[0] > rules.max_accuracy_drop:
        return (f"{shown}, test accuracy {accuracy[0]:.2%} against PyTorch's {accuracy[1]:.2%}: it drops more than "
                f"max_accuracy_drop {rules.max_accuracy_drop:g} (the rule for a lossy deployable)")
    return None


@dataclass
class Deployment:
    """A model's deployable ONNX file, checked and parity-tested, with its measurements."""

    path: Path
    deploy_format: str
    metrics: dict[str, float]
    session: Any  # the session (of the chosen runtime) that measured it
    example: torch.Tensor  # the fixed parity batch
    runtime: str = "onnxruntime"  # where it runs: mcp.deploy.runtimes
    runtime_times: dict[str, float] | None = None  # CPU p50 (ms) in each runtime timed, when several were


def export_deployable(model: nn.Module, input_shape: Sequence[int], train_loader, test_loader, tmp: Path, *,
                      opset: int = 17, optimize: bool = True, rules: ParityRules = ParityRules(),
                      parity_samples: int = 256, deployed: tuple[Path, str] | None = None,
                      what: str = "model", runtime: str = "onnxruntime", timing_s: float = 0.3) -> Deployment:
    """Build ``model``'s deployable ONNX file (see :func:`build_onnx`), run ONNX's full
    checker, compare the runtime with PyTorch on the first ``parity_samples`` test images
    and on the test split (failing loudly, naming the rule, see :class:`ParityRules`).
    ``runtime``: a runtime name, or ``auto``: every available runtime is timed on the file
    side by side (``timing_s`` each) and the fastest that passes its parity check is kept."""
    x = parity_batch(test_loader, parity_samples)
    path, fmt, counts = build_onnx(model, input_shape, tmp, opset, optimize, deployed)
    check_onnx(path)
    metrics = {**counts, "size_bytes_onnx": float(path.stat().st_size),
               "size_bytes_fp32": float(size_bytes_fp32(model)), "macs": float(count_macs(model, input_shape)),
               **count_params(model)}
    torch_test = evaluate(model, test_loader)
    metrics.update(test_accuracy=torch_test["accuracy"], test_loss=torch_test["loss"])
    reference = reference_model(model, fmt, input_shape, train_loader)
    times, order = None, [runtime]
    if runtime == "auto":
        _, times = rt.fastest(path, input_shape, timing_s)
        order = sorted(times, key=times.get)  # the next fastest when a faster one fails its check
        metrics.update(rt.latency_metrics(times))
    failures = []
    for name in order:
        session = rt.session(path, name)
        par = parity(reference, session, x)
        test = ort_evaluate(session, test_loader)
        failure = parity_failure(fmt, par, rules, name, (test["accuracy"], torch_test["accuracy"]))
        if failure is None:
            metrics.update(onnx_max_abs_diff=par["max_abs_diff"], onnx_agreement=par["agreement"],
                           onnx_test_accuracy=test["accuracy"], onnx_test_loss=test["loss"])
            return Deployment(path, fmt, metrics, session, x, name, times)
        failures.append(f"in {name}, {failure}")
    raise McpError(f"parity check failed for {what!r} ({fmt}) {'; '.join(failures)}; nothing was logged or "
                   f"registered")
