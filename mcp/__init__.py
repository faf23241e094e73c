"""mcp: a tracked model compression pipeline for PyTorch vision models.

`import mcp` stays light: torch, mlflow and friends load in the modules that use them.
"""

__version__ = "0.1.0"

from mcp.errors import ConfigError, McpError  # noqa: E402

__all__ = ["ConfigError", "McpError", "__version__"]
