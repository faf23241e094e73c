"""Deep Compression's trained quantization: per-layer weight sharing with 2^b centroids.

Each layer's non-zero weights are clustered with scikit-learn's k-means (one
dimension, ``n_init=1``) from a ``forgy`` (random weights), ``density`` (evenly spaced
quantiles of the weights' distribution) or ``linear`` (evenly spaced between min and
max) initialisation, as in Han et al. The layer's weight becomes
``centroids[labels] * mask``: the centroids are the trainable parameters, so the
gradient of a centroid is the sum of the gradients of the weights that share it, and
zeros (pruned weights) stay zero.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from mcp.quantization.names import KMEANS_INITS


def initial_centroids(values: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    if init == "forgy":
        rng = np.random.default_rng(seed)
        return rng.choice(values, size=k, replace=False)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    raise ValueError(f"unknown k-means init {init!r}; choose one of {', '.join(KMEANS_INITS)}")


def cluster(values: np.ndarray, k: int, init: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, labels) of 1-D values with at most k clusters, all centroids distinct
    and non-zero. Layers with k or fewer distinct values keep them exactly."""
    from sklearn.cluster import KMeans

    distinct = np.unique(values)
    if distinct.size <= k:
        return distinct.astype(np.float32), np.searchsorted(distinct, values)
    init_c = np.unique(initial_centroids(values, k, init, seed))
    if init_c.size < k:  # ties in the initialisation: top up with unused distinct values
        extra = np.setdiff1d(distinct, init_c)
        init_c = np.sort(np.concatenate([init_c, np.random.default_rng(seed).choice(extra, k - init_c.size,
                                                                                    replace=False)]))
    km = KMeans(n_clusters=k, init=init_c.reshape(-1, 1), n_init=1, max_iter=100, random_state=seed)
    labels = km.fit_predict(values.reshape(-1, 1).astype(np.float64))
    centroids = km.cluster_centers_.ravel().astype(np.float32)
    # sklearn re-seeds empty clusters; still make every centroid distinct and non-zero
    centroids = _distinct_nonzero(centroids)
    order = np.argsort(centroids)
    rank = np.empty_like(order)
    rank[order] = np.arange(k)
    return centroids[order], rank[labels]


def _distinct_nonzero(c: np.ndarray) -> np.ndarray:
    c = c.copy()
    for i in range(c.size):
        while c[i] == 0 or np.sum(c == c[i]) > 1:
            c[i] = np.nextafter(c[i], np.float32(np.inf) if c[i] >= 0 else np.float32(-np.inf))
    return c


class _Shared:
    """Forward pre-hook: each shared parameter = centroids[labels] * mask."""

    def __init__(self, params: tuple[str, ...]):
        self.params = params

    def __call__(self, module: nn.Module, _inputs) -> None:
        for p in self.params:
            setattr(module, p, getattr(module, f"{p}_centroids")[getattr(module, f"{p}_labels")]
                    * getattr(module, f"{p}_mask"))


class WeightSharing:
    """k-means weight sharing attached to layers (their weights, and their biases when
    ``share_biases``: each parameter gets its own 2^b codebook); :meth:`bake` restores
    plain parameters."""

    def __init__(self, layers: Mapping[str, nn.Module], bits: Mapping[str, int], init: str = "linear",
                 seed: int = 0, share_biases: bool = False):
        self.layers = dict(layers)
        self.bits = dict(bits)
        self._hooks = {}
        self.shared: dict[str, tuple[str, ...]] = {}
        for name, module in self.layers.items():
            params = ("weight", "bias") if share_biases and module.bias is not None else ("weight",)
            for p in params:
                w = getattr(module, p).detach()
                mask = w != 0
                values = w[mask].cpu().numpy().astype(np.float32)
                labels = torch.zeros(w.shape, dtype=torch.long)
                if values.size:
                    centroids, lab = cluster(values, 2 ** self.bits[name], init, seed)
                    labels[mask.cpu()] = torch.from_numpy(np.asarray(lab, dtype=np.int64))
                else:
                    centroids = np.zeros(1, dtype=np.float32)
                del module._parameters[p]
                module.register_parameter(f"{p}_centroids", nn.Parameter(torch.from_numpy(centroids).to(w.device)))
                module.register_buffer(f"{p}_labels", labels.to(w.device))
                module.register_buffer(f"{p}_mask", mask.to(w.dtype))
            self.shared[name] = params
            hook = _Shared(params)
            hook(module, None)
            self._hooks[name] = module.register_forward_pre_hook(hook)

    def codebooks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``<layer>.<param>`` -> (centroids, labels, mask)."""
        return {f"{n}.{p}": (getattr(m, f"{p}_centroids").detach(), getattr(m, f"{p}_labels"),
                             getattr(m, f"{p}_mask").bool())
                for n, m in self.layers.items() for p in self.shared[n]}

    @torch.no_grad()
    def bake(self) -> None:
        for name, module in self.layers.items():
            self._hooks[name].remove()
            for p in self.shared[name]:
                value = (getattr(module, f"{p}_centroids")[getattr(module, f"{p}_labels")]
                         * getattr(module, f"{p}_mask")).detach().clone()
                del module._parameters[f"{p}_centroids"]
                del module._buffers[f"{p}_labels"], module._buffers[f"{p}_mask"]
                module.__dict__.pop(p, None)
                setattr(module, p, nn.Parameter(value))
        self._hooks.clear()
