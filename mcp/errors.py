"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class McpError(Exception):
    """Bad input or an environment problem the user can fix (never a bug)."""


class ConfigError(McpError, ValueError):
    """An invalid configuration value, key or file."""
