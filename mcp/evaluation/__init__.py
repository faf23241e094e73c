"""Metrics (accuracy, params, MACs, sizes, latency, memory) and plots."""
