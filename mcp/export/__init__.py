"""ONNX export and ONNX Runtime helpers (onnx and onnxruntime load on use)."""

from mcp.export.onnx import export_onnx, ort_evaluate, ort_predict, ort_session

__all__ = ["export_onnx", "ort_evaluate", "ort_predict", "ort_session"]
