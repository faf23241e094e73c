"""Deep Compression's trained quantization: per-layer weight sharing with 2^b centroids.

Each layer's non-zero weights are clustered with Lloyd's k-means in one dimension
(:func:`lloyd_1d`, one run) from a ``forgy`` (random weights), ``density`` (evenly spaced
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


def lloyd_1d(values: np.ndarray, init: np.ndarray, max_iter: int = 100, tol: float = 1e-4
             ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of 1-D ``values`` from the sorted centroids ``init``: (centroids,
    labels). In one dimension every cluster is a run of the sorted values between the
    midpoints of neighbouring centroids, so an iteration is a binary search per
    centroid and a difference of prefix sums, not a distance to every value. It stops,
    as scikit-learn's Lloyd does, when the labels no longer change or the centroids
    move by at most ``tol`` times the values' variance (summed squared shift); an
    empty cluster takes the value farthest from its centroid. The labels are those of
    the final centroids (nearest, the lower one on a tie)."""
    x = np.sort(values.astype(np.float64))
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    c = np.sort(np.asarray(init, dtype=np.float64))
    threshold = tol * float(np.var(x))
    bounds = None
    for _ in range(max_iter):
        edges = np.searchsorted(x, (c[1:] + c[:-1]) / 2, side="right")
        new_bounds = np.concatenate([[0], edges, [x.size]])
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # as scikit-learn does: an empty cluster takes the value farthest from its centroid
            owner = np.repeat(np.arange(c.size), counts)
            far = np.argsort(-(x - c[owner]) ** 2, kind="stable")[:empty.size]
            for e, f in zip(empty.tolist(), far.tolist()):
                sums[owner[f]] -= x[f]
                counts[owner[f]] -= 1
                sums[e], counts[e] = x[f], 1
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        shift = float(np.sum((moved - c) ** 2))
        c = np.sort(moved)
        if shift <= threshold:
            break
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, values, side="left")
    return c, labels


def cluster(values: np.ndarray, k: int, init: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, labels) of 1-D values with at most k clusters, all centroids distinct
    and non-zero. Layers with k or fewer distinct values keep them exactly."""
    distinct = np.unique(values)
    if distinct.size <= k:
        return distinct.astype(np.float32), np.searchsorted(distinct, values)
    init_c = np.unique(initial_centroids(values, k, init, seed))
    if init_c.size < k:  # ties in the initialisation: top up with unused distinct values
        extra = np.setdiff1d(distinct, init_c)
        init_c = np.sort(np.concatenate([init_c, np.random.default_rng(seed).choice(extra, k - init_c.size,
                                                                                    replace=False)]))
    centroids, labels = lloyd_1d(values, init_c)
    centroids = _distinct_nonzero(centroids.astype(np.float32))
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
