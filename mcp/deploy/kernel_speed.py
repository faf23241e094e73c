"""Which layers a runtime (ONNX Runtime, or OpenVINO reading the same file) runs faster
in INT8 than in float32, at their own shapes, on this CPU.

Each Conv and Gemm node of a float32 ONNX model is timed alone, twice, in ONNX Runtime
(batch 1, the given thread count): as float32, and as INT8 in the QDQ form that ONNX
Runtime fuses into its integer kernel (``DequantizeLinear -> Conv -> QuantizeLinear``
becomes ``QLinearConv``; Gemm becomes ``QGemm``), UINT8 activations in and out, per-channel
INT8 weights, INT32 bias. Narrow layers often run slower in INT8 than in float32 (the
integer kernels pack and requantize around a small product), wide ones faster; the
micro-benchmark says which, per shape, instead of a rule of thumb. OpenVINO reads the same
single-node models (its CPU plugin runs the QDQ form as an integer convolution or matrix
product, u8 in and out) and answers differently for the same shape: the choice is made on
the runtime the model will run on.

The timings are cached in ``$MCP_CACHE_DIR/kernel_speed.json`` (default
``~/.cache/mcp``) under the CPU model, the ONNX Runtime version and the thread count, so a
shape is timed once per kind of machine and runtime. The cost of converting activations where an INT8
layer meets a float32 one is not in these timings: the deployed model's own latency,
measured end to end, is what a run reports.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mcp.evaluation.ort_bench import OPENVINO_PRECISION

CACHE_NAME = "kernel_speed.json"
MARGIN = 0.1  # INT8 must be this much faster (a share of the float32 time): closer calls are timing noise


@dataclass(frozen=True)
class LayerSpeed:
    node: str  # the ONNX node's name
    signature: str  # op, shapes and attributes: what the cache is keyed by
    fp32_ms: float
    int8_ms: float

    @property
    def int8_faster(self) -> bool:
        return self.int8_ms < (1 - MARGIN) * self.fp32_ms


def weighted_nodes(model) -> list:
    """The Conv, Gemm and MatMul nodes with a constant weight, in graph order (one per
    layer of the exported module, in execution order: a ``Linear`` on inputs of more than
    two dimensions, as in a transformer, exports as ``MatMul`` by its transposed weight,
    ``[in, out]``)."""
    inits = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n for n in model.graph.node if len(n.input) > 1 and n.input[1] in inits and (
        n.op_type in ("Conv", "Gemm") or (n.op_type == "MatMul" and inits[n.input[1]] == 2))]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    root = os.environ.get("MCP_CACHE_DIR") or Path.home() / ".cache" / "mcp"
    return Path(root) / CACHE_NAME


def machine_key(threads: int, runtime: str = "onnxruntime") -> str:
    """What a cached timing holds for: the CPU, the runtime with its version (and, for
    OpenVINO, its inference precision), the thread count."""
    from importlib.metadata import version

    if runtime == "onnxruntime":
        return f"{cpu_model()} | onnxruntime {version('onnxruntime')} | {threads} thread(s)"
    return f"{cpu_model()} | {runtime} {version('openvino')} | {threads} thread(s)"


def _read_cache(path: Path) -> dict[str, dict[str, list[float]]]:
    """The cache, with anything malformed left out (it is timed again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: {sig: [float(v) for v in pair] for sig, pair in entries.items()
                  if isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) and v > 0
                                                                       for v in pair)}
            for key, entries in data.items() if isinstance(entries, dict)}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a worker reading it never sees half a file); a cache that cannot be
    written only costs timing again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            json.dump(data, fh, indent=0, sort_keys=True)
        os.replace(fh.name, path)
    except OSError:
        pass


def _shapes(model) -> dict[str, list[int]]:
    """Static shapes of every tensor at batch 1 (ONNX shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if any(d.dim_value <= 0 for d in list(dims)[1:]):
            continue  # only the batch may be dynamic: a layer fed such a tensor has no static shape to time
        out[v.name] = [d.dim_value if d.dim_value > 0 else 1 for d in dims]
    for i in model.graph.initializer:
        out[i.name] = list(i.dims)
    missing = [n.input[0] for n in weighted_nodes(model) if n.input[0] not in out]
    if missing:  # shapes inference cannot follow (a transformer's reshapes): run the model once to see them
        out.update(_run_shapes(model, missing))
    return out


def _run_shapes(model, names: list[str]) -> dict[str, list[int]]:
    """The shapes of the tensors ``names`` at batch 1, from one run of the model on zeros."""
    import copy

    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    dims = [1 if not isinstance(d, int) or d <= 0 else d for d in first.shape]
    results = session.run(names, {first.name: np.zeros(dims, dtype=np.float32)})
    return {n: list(r.shape) for n, r in zip(names, results)}


def _layer(node, shapes: dict[str, list[int]]) -> dict[str, Any]:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()}
    x, w = shapes.get(node.input[0]), shapes[node.input[1]]
    if not x:
        raise ValueError(f"no static shape for the input of {node.name}")
    return {"op": node.op_type, "x": x, "w": w, "bias": len(node.input) > 2 and bool(node.input[2]),
            "attrs": attrs}


def signature(layer: dict[str, Any]) -> str:
    attrs = ",".join(f"{k}={v}" for k, v in sorted(layer["attrs"].items()))
    return (f"{layer['op']} x{'x'.join(map(str, layer['x']))} w{'x'.join(map(str, layer['w']))} "
            f"bias={int(layer['bias'])} {attrs}")


def _models(layer: dict[str, Any], opset: int = 17):
    """(float32, INT8 QDQ) single-node models of ``layer``, with random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    op, attrs, x, w = layer["op"], layer["attrs"], layer["x"], layer["w"]
    if op == "Gemm" and len(x) > 2:
        x = [x[0], int(np.prod(x[1:]))]
    by_column = op == "MatMul" or (op == "Gemm" and not attrs.get("transB", 0))  # a weight stored [in, out]
    out_channels = w[1] if by_column else w[0]
    weight = rng.standard_normal(w).astype(np.float32) * 0.1
    bias = rng.standard_normal(out_channels).astype(np.float32) * 0.1

    def build(nodes, inits, in_type, out_type):
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", in_type, x)],
                                  [helper.make_tensor_value_info("y", out_type, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    inputs = ["x", "w"] + (["b"] if layer["bias"] else [])
    fp32 = build([helper.make_node(op, inputs, ["y"], **attrs)],
                 [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(bias, "b")] if layer["bias"] else []),
                 TensorProto.FLOAT, TensorProto.FLOAT)
    axis = 1 if by_column else 0
    w_scale = np.full(out_channels, 0.01, np.float32)
    x_scale = np.float32(0.02)
    q_weight = np.clip(np.round(weight / 0.01), -127, 127).astype(np.int8)
    q_bias = np.round(bias / (x_scale * w_scale)).astype(np.int32)
    inits = [numpy_helper.from_array(q_weight, "wq"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(out_channels, np.int8), "wz"),
             numpy_helper.from_array(np.array(x_scale), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(np.array(np.float32(0.05)), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wf"], axis=axis)]
    if layer["bias"]:
        inits += [numpy_helper.from_array(q_bias, "bq"), numpy_helper.from_array(x_scale * w_scale, "bs"),
                  numpy_helper.from_array(np.zeros(out_channels, np.int32), "bz")]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bf"], axis=0))
    nodes += [helper.make_node(op, ["xf", "wf"] + (["bf"] if layer["bias"] else []), ["yf"], **attrs),
              helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    int8 = build(nodes, inits, TensorProto.UINT8, TensorProto.UINT8)
    return fp32, int8, x


def _runner(model, threads: int, runtime: str = "onnxruntime") -> Callable[[np.ndarray], Any]:
    """A function running the single-node ``model`` on one input, in ``runtime`` with the
    settings the deployed file gets there (see :mod:`mcp.evaluation.ort_bench`)."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[runtime]})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def time_pair(layer: dict[str, Any], threads: int = 1, seconds: float = 0.2, rounds: int = 4,
              runtime: str = "onnxruntime") -> tuple[float, float]:
    """Median ms per call of the float32 and the INT8 form of ``layer`` in ``runtime``,
    timed in alternating slices (so that a busy moment of the machine hits both alike)."""
    fp32, int8, x_shape = _models(layer)
    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal(x_shape).astype(np.float32), rng.integers(0, 256, x_shape).astype(np.uint8)]
    runs = [_runner(fp32, threads, runtime), _runner(int8, threads, runtime)]
    times: list[list[float]] = [[], []]
    for run, feed in zip(runs, feeds):
        for _ in range(10):
            run(feed)
    for _ in range(rounds):
        for k, (run, feed) in enumerate(zip(runs, feeds)):
            end = time.perf_counter() + seconds / rounds / 2
            while True:
                t0 = time.perf_counter()
                run(feed)
                t1 = time.perf_counter()
                times[k].append(t1 - t0)
                if t1 > end and len(times[k]) >= 5:
                    break
    return float(np.median(times[0]) * 1000), float(np.median(times[1]) * 1000)


def layer_speeds(fp32_path: str | Path, threads: int = 1, cache: Path | None = None,
                 runtime: str = "onnxruntime") -> list[LayerSpeed]:
    """Float32 against INT8 time in ``runtime`` of every Conv/Gemm/MatMul layer of the model
    at ``fp32_path`` (in graph order), from the cache where this machine timed that shape
    in that runtime before."""
    import onnx

    model = onnx.load(str(fp32_path))
    nodes = weighted_nodes(model)
    if not nodes:
        return []
    shapes = _shapes(model)
    cache = cache or cache_path()
    data = _read_cache(cache)
    key = machine_key(threads, runtime)
    known = data.setdefault(key, {})
    out, timed = [], False
    for node in nodes:
        layer = _layer(node, shapes)
        sig = signature(layer)
        if sig not in known:
            known[sig] = list(time_pair(layer, threads, runtime=runtime))
            timed = True
        fp32_ms, int8_ms = known[sig]
        out.append(LayerSpeed(node.name, sig, float(fp32_ms), float(int8_ms)))
    if timed:
        fresh = _read_cache(cache)  # another process may have added shapes meanwhile
        fresh.setdefault(key, {}).update(known)
        _write_cache(cache, fresh)
    return out


def int8_layers(layer_names: Sequence[str], fp32_path: str | Path, threads: int = 1,
                runtime: str = "onnxruntime") -> dict[str, LayerSpeed]:
    """``layer name -> its LayerSpeed`` in ``runtime`` for the model's layers (``layer_names``
    in execution order, matching the ONNX graph's weighted nodes one to one)."""
    speeds = layer_speeds(fp32_path, threads, runtime=runtime)
    if len(speeds) != len(layer_names):
        raise ValueError(f"the ONNX graph has {len(speeds)} weighted nodes; the model has {len(layer_names)} layers")
    return dict(zip(layer_names, speeds))
