"""The search's core: spaces, one trial's model, the objective, the study and the claims
that let many workers share it. Optuna over per-layer prune ratios and bit-widths under a
real size (or latency) budget; :func:`mcp.search` and ``mcp search`` run it."""

from mcp.tuner.space import Space, TrialConfig, build_space, sample, space_file_for, uniform

__all__ = ["Space", "TrialConfig", "build_space", "sample", "space_file_for", "uniform"]
