"""Optuna search over per-layer prune ratios and bit-widths under a real size budget."""

import sys
import types
from typing import Any

from mcp.search.space import Space, TrialConfig, build_space, sample, space_file_for, uniform

__all__ = ["Space", "TrialConfig", "build_space", "sample", "space_file_for", "uniform"]


class _Callable(types.ModuleType):
    """Calling this package calls its API function (``mcp.NAME(...)``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from mcp import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
