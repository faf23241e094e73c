"""The quantization package's vocabulary that the configuration and the CLI offer before
torch loads: activation-range observers (:mod:`mcp.quantization.uniform`) and k-means
centroid initialisations (:mod:`mcp.quantization.kmeans`)."""

OBSERVERS = ("minmax", "percentile", "entropy")
KMEANS_INITS = ("forgy", "density", "linear")
