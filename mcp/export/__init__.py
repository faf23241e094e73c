"""ONNX export, checking, optimisation, parity, and ONNX Runtime helpers (onnx and
onnxruntime load on use)."""

import sys
import types
from typing import Any

from mcp.export.onnx import (check_onnx, export_onnx, node_count, optimize_onnx, ort_evaluate, ort_predict,
                             ort_session, parity)

__all__ = ["check_onnx", "export_onnx", "node_count", "optimize_onnx", "ort_evaluate", "ort_predict", "ort_session",
           "parity"]


class _Callable(types.ModuleType):
    """Calling this package calls its API function (``mcp.NAME(...)``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from mcp import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
