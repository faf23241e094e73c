"""ONNX export, checking, optimisation, parity, and ONNX Runtime helpers (onnx and
onnxruntime load on use)."""

from mcp.export.onnx import (check_onnx, export_onnx, node_count, optimize_onnx, ort_evaluate, ort_predict,
                             ort_session, parity)

__all__ = ["check_onnx", "export_onnx", "node_count", "optimize_onnx", "ort_evaluate", "ort_predict", "ort_session",
           "parity"]
