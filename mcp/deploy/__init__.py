"""Deployment: ONNX export, checking, optimisation, parity, ONNX Runtime helpers, the
deployable file of each quantization method and per-shape INT8 kernel timings (onnx and
onnxruntime load on use). :func:`mcp.export` exports one model."""

from mcp.deploy.onnx import (check_onnx, export_onnx, node_count, optimize_onnx, ort_evaluate, ort_predict,
                             ort_session, parity)

__all__ = ["check_onnx", "export_onnx", "node_count", "optimize_onnx", "ort_evaluate", "ort_predict", "ort_session",
           "parity"]
