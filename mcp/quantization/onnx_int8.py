"""Deployable INT8 ONNX models, made with ONNX Runtime's quantization tools.

- :func:`static_int8`: post-training static quantization, QDQ format, per-channel
  symmetric INT8 weights (ONNX Runtime's reduced range [-64, 64] by default),
  UINT8 activations calibrated on training batches (min-max, percentile or entropy),
  float logits. BatchNorm is already folded by the export.
- :func:`dynamic_int8`: INT8 weights of the fully connected layers, activations
  quantized at run time (``Gemm`` is first rewritten as ``MatMul`` + ``Add``, the form
  ONNX Runtime's dynamic quantizer handles).
- :func:`weight_int8_dq`: weights that mcp already put on a b-bit grid (fixed point,
  QAT), stored as INT8 initializers behind ``DequantizeLinear`` (per channel), exact:
  ONNX Runtime has no kernels for b < 8, so INT8 is the nearest deployable container.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mcp.deploy.kernel_speed import weighted_nodes
from mcp.deploy.onnx import INPUT

CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")  # what static INT8 quantizes in a graph with attention
NORMS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization")  # ONNX Runtime's QDQNormalization
_AXIS_LINE = re.compile(r"Axis -?\d+ is out-of-range for weight '(.*)' with rank 1$")
_SEEN: set[str] = set()  # the quantizer's lines already let through in this process


class _QuantizerLines(logging.Filter):
    """ONNX Runtime's quantizer logs on the root logger, the same line once per node.

    "Axis 1 is out-of-range for weight 'x' with rank 1" comes from each normalization
    node (LayerNormalization; InstanceNormalization, which the export makes of a
    GroupNorm): with per-channel weights it looks for channel axis 1 of the node's scale,
    a 1-D vector that has none, and quantizes that scale per tensor instead, as it would
    without per-channel weights. Nothing is wrong and nothing to do: for the scales of
    normalization nodes (``norm_scales``) the line is left out. Any other line is let
    through once per process."""

    def __init__(self, norm_scales: set[str]):
        super().__init__()
        self.norm_scales = norm_scales

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        axis = _AXIS_LINE.match(message)
        if axis and axis.group(1) in self.norm_scales:
            return False
        if message in _SEEN:
            return False
        _SEEN.add(message)
        return True


@contextlib.contextmanager
def _quantizer_lines(model_path: str | Path) -> Iterator[None]:
    """While ONNX Runtime quantizes the model at ``model_path``: see :class:`_QuantizerLines`."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    lines = _QuantizerLines({n.input[1] for n in graph.node if n.op_type in NORMS and len(n.input) > 1})
    root = logging.getLogger()
    root.addFilter(lines)
    try:
        yield
    finally:
        root.removeFilter(lines)


class _Reader:
    """ONNX Runtime CalibrationDataReader over (x, y) batches."""

    def __init__(self, batches: Sequence):
        self.items = iter([{INPUT: x.numpy().astype(np.float32)} for x, _ in batches])

    def get_next(self):
        return next(self.items, None)


def static_int8(fp32_path: str | Path, out_path: str | Path, batches: Sequence, observer: str = "minmax",
                per_channel: bool = True, reduce_range: bool = True, float_layers: Sequence[int] = (),
                op_types: Sequence[str] | None | str = "auto") -> Path:
    """``float_layers``: indices (in graph order) of Conv/Gemm/MatMul layers left in float32.
    ``op_types``: the operator types quantized; None: every type ONNX Runtime's QDQ
    quantizer knows; ``"auto"``: the same, except in a graph with attention (a Softmax
    beside a LayerNormalization, :func:`has_attention`): there only the operators with a weight
    (Conv, Gemm, a MatMul by a constant matrix) run INT8, with float outputs; the
    attention's own products (queries by keys, scores by values), LayerNorm, Softmax,
    GELU and the residual additions stay float (``benchmarks/transformer_int8.py``
    measures both on a ViT trained on MNIST).
    ``reduce_range`` keeps weights in [-64, 64]: ONNX Runtime's x86 u8 x s8 kernels can
    sum pairs of products into saturating 16-bit integers (the non-VNNI path), and
    full-range weights overflow them (measured on this project's machine: 4% of
    predictions flipped on a small CNN)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    excluded = _node_names(Path(fp32_path), float_layers)  # by name: pre-processing reorders the graph
    attention = op_types == "auto" and has_attention(fp32_path)
    op_types = None if op_types == "auto" else op_types
    float_outputs = ["Gemm", *(WEIGHTED_OPS if attention else ())]
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        _check_names(prepped, excluded)
        if attention:
            op_types, excluded = WEIGHTED_OPS, excluded + _unweighted_products(prepped)
        with _quantizer_lines(prepped):
            quantize_static(str(prepped), str(out_path), reader_cls(batches), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATION[observer]),
                            nodes_to_exclude=excluded, op_types_to_quantize=list(op_types) if op_types else None,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                           "OpTypesToExcludeOutputQuantization": float_outputs})
    return Path(out_path)


def _unweighted_products(path: Path) -> list[str]:
    """The names of the MatMul nodes of the graph at ``path`` that multiply two activations
    (attention's queries by keys, scores by values): no weight of theirs to quantize."""
    import onnx

    model = onnx.load(str(path))
    weighted = {n.name for n in weighted_nodes(model)}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in weighted]


def has_attention(path: str | Path) -> bool:
    """Whether the ONNX graph at ``path`` has attention: a Softmax beside a LayerNormalization."""
    import onnx

    kinds = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return {"Softmax", "LayerNormalization"} <= kinds


def _node_names(path: Path, layers: Sequence[int]) -> list[str]:
    """The names of the ``layers``-th weighted nodes (Conv, Gemm, MatMul) of the model at ``path``
    (torch's export keeps execution order, which is the order of the model's layers)."""
    import onnx

    if not layers:
        return []
    nodes = weighted_nodes(onnx.load(str(path)))
    if max(layers) >= len(nodes):
        raise ValueError(f"layer index {max(layers)} is out of range: the graph has {len(nodes)} weighted nodes")
    return [nodes[i].name for i in layers]


def _check_names(path: Path, names: Sequence[str]) -> None:
    import onnx

    present = {n.name for n in onnx.load(str(path)).graph.node}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"ONNX Runtime's pre-processing renamed or removed node(s) {', '.join(missing)}: cannot "
                         f"leave them in float32")


def gemm_to_matmul(model) -> None:
    """Rewrite ``Gemm(A, B, C, transB=1)`` with constant B as ``MatMul(A, B^T) + C``."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not simple:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = node.input[1] + "_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name + "_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def dynamic_int8(fp32_path: str | Path, out_path: str | Path, per_channel: bool = True,
                 reduce_range: bool = True) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    gemm_to_matmul(model)
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(rewritten))
        with _quantizer_lines(rewritten):
            quantize_dynamic(str(rewritten), str(out_path), op_types_to_quantize=["MatMul"],
                             per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    return Path(out_path)


def weight_int8_dq(fp32_path: str | Path, out_path: str | Path, layer_ints: Sequence[np.ndarray | None]) -> Path:
    """Store the weights of the model's weighted nodes (Conv, Gemm, MatMul: in graph order, one entry per
    layer in execution order; None leaves a layer float) as INT8 + per-channel
    ``DequantizeLinear``. ``layer_ints`` are the signed integers ``q - zero`` of the
    quantized weights; the per-channel scale is refitted to the exported weight (the
    export folds BatchNorm, which multiplies each output channel by a constant)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    inits = {i.name: i for i in model.graph.initializer}
    weighted = weighted_nodes(model)
    if len(weighted) != len(layer_ints):
        raise ValueError(f"the ONNX graph has {len(weighted)} weighted nodes; the model has {len(layer_ints)} layers")
    new_nodes = []
    for node, ints in zip(weighted, layer_ints):
        if ints is None:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        q = np.asarray(ints, dtype=np.int64)
        column = node.op_type == "MatMul"  # its weight is the layer's, transposed: [in, out]
        if column:
            w = w.T
        if w.shape != q.shape:
            raise ValueError(f"ONNX weight {node.input[1]} has shape {w.shape}; the quantized layer has {q.shape}")
        if np.abs(q).max(initial=0) > 127:
            raise ValueError("integers outside [-127, 127] do not fit the INT8 container")
        flat_w, flat_q = w.reshape(w.shape[0], -1), q.reshape(q.shape[0], -1).astype(np.float64)
        denom = (flat_q ** 2).sum(1)
        scale = np.where(denom > 0, (flat_w * flat_q).sum(1) / np.maximum(denom, 1), 1.0)
        sign = np.where(scale < 0, -1, 1)
        scale, flat_q = np.abs(scale), flat_q * sign[:, None]
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        err = np.abs(flat_q * scale[:, None] - flat_w).max(initial=0)
        if err > 1e-5 * max(np.abs(flat_w).max(initial=0), 1e-12):
            raise ValueError(f"ONNX weight {node.input[1]} is not on the quantization grid (max error {err:.3g})")
        name = node.input[1]
        stored = flat_q.reshape(q.shape).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(stored.T) if column else stored, name + "_int8"),
            numpy_helper.from_array(scale, name + "_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), name + "_zero")])
        new_nodes.append(helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero"],
                                          [name], name=name + "_dq", axis=1 if column else 0))
    # DequantizeLinear outputs must precede their consumers
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return Path(out_path)

