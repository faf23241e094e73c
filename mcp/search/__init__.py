"""Optuna search over per-layer prune ratios and bit-widths under a real size budget."""

from mcp.search.space import Space, TrialConfig, build_space, sample, space_file_for, uniform

__all__ = ["Space", "TrialConfig", "build_space", "sample", "space_file_for", "uniform"]
