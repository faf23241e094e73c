"""Pruning criteria. Each returns scores only (higher = more important); the pruners
decide what to cut. A criterion gives per-weight scores (usable unstructured, and
structured by summing over each channel and its coupled weights), per-channel scores
(structured only), or both.

| criterion      | unstructured | structured | scores |
|----------------|--------------|------------|--------|
| magnitude      | yes          | yes        | ``|w|^p`` (p = 1 or 2) |
| bn_scaling     | no: gamma scales a whole channel | yes | ``|gamma|`` of the BN after a layer |
| second_order   | yes          | yes        | OBD saliency ``h_ii w^2 / 2``, diagonal Hessian by empirical Fisher or Hutchinson |
| apoz           | no: activations belong to channels | yes | ``1 - APoZ`` of the channel's post-ReLU output |
| regression     | no: reconstruction selects input channels | yes | ThiNet greedy reconstruction error of the consumers |
| sensitivity    | yes          | yes        | first-order Taylor ``|w * dL/dw|`` |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from mcp.errors import ConfigError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Scores:
    """What a criterion produced for one pruning event."""

    weight: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # same shape as module.weight
    out_channel: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # per output channel (BN too)
    in_channel: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # per input channel of a consumer


class Criterion:
    name = ""
    granularities: tuple[str, ...] = ("unstructured", "structured")
    why_not: dict[str, str] = {}
    needs_data = False

    def __init__(self, **_options) -> None:
        pass

    def scores(self, model: nn.Module, layers: dict[str, nn.Module], batches: Batches,
               device: str) -> Scores:
        raise NotImplementedError

    def after_prune(self, model: nn.Module, state: dict, batches: Batches, device: str) -> None:
        """Hook after a structured pruning event (ThiNet refits its consumers here)."""

    def before_prune(self, model: nn.Module, layers: dict[str, nn.Module], batches: Batches,
                     device: str) -> dict:
        return {}


_CRITERIA: dict[str, Callable[..., Criterion]] = {}


def register_criterion(cls):
    _CRITERIA[cls.name] = cls
    return cls


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def create_criterion(name: str, granularity: str, **options) -> Criterion:
    if name not in _CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; choose one of: {', '.join(criterion_names())}")
    crit = _CRITERIA[name](**options)
    if granularity not in crit.granularities:
        raise ConfigError(f"criterion {name!r} does not support {granularity} pruning: {crit.why_not[granularity]}; "
                          f"use granularity {' or '.join(crit.granularities)}")
    return crit


def _weight_params(layers: dict[str, nn.Module]) -> list[nn.Module]:
    return list(layers.values())


def _grad_pass(model: nn.Module, batches: Batches, device: str, per_batch: Callable[[], None]) -> None:
    """Run forward/backward over ``batches``; ``per_batch`` reads the gradients after each."""
    was_training = model.training
    model.eval()  # BN statistics stay as they are; dropout off
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        per_batch()
    model.zero_grad(set_to_none=True)
    model.train(was_training)


@register_criterion
class Magnitude(Criterion):
    name = "magnitude"

    def __init__(self, norm: int = 1, **_):
        if norm not in (1, 2):
            raise ConfigError(f"norm={norm!r} is not allowed; choose 1 (L1) or 2 (L2)")
        self.p = norm

    def scores(self, model, layers, batches, device) -> Scores:
        return Scores(weight={m: m.weight.detach().abs().pow(self.p) for m in layers.values()})


@register_criterion
class BNScaling(Criterion):
    """Network slimming (Liu et al. 2017): a channel is as important as its BN scale."""

    name = "bn_scaling"
    granularities = ("structured",)
    why_not = {"unstructured": "a BatchNorm scale belongs to a whole channel, not to single weights"}

    def scores(self, model, layers, batches, device) -> Scores:
        bns = {m: m.weight.detach().abs() for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
        if not bns:
            raise ConfigError("criterion 'bn_scaling' needs BatchNorm layers, and this model has none; "
                              "use a BN model (e.g. resnet20, vgg16_bn, tiny_cnn) or another criterion")
        return Scores(out_channel=bns)


@register_criterion
class SecondOrder(Criterion):
    """Optimal Brain Damage (LeCun et al. 1990): saliency ``h_ii * w_i^2 / 2``."""

    name = "second_order"
    needs_data = True

    def __init__(self, hessian: str = "fisher", **_):
        if hessian not in ("fisher", "hutchinson"):
            raise ConfigError(f"hessian={hessian!r} is not allowed; choose fisher or hutchinson")
        self.hessian = hessian

    def scores(self, model, layers, batches, device) -> Scores:
        mods = _weight_params(layers)
        diag = {m: torch.zeros_like(m.weight) for m in mods}
        if self.hessian == "fisher":  # E[g^2] of batch gradients
            def fisher() -> None:
                for m in mods:
                    diag[m] += m.weight.grad.detach() ** 2

            _grad_pass(model, batches, device, fisher)
        else:  # Hutchinson: E[v * Hv] with Rademacher v, by double backprop
            gen = torch.Generator(device="cpu").manual_seed(0)
            was_training = model.training
            model.eval()
            params = [m.weight for m in mods]
            for x, y in batches:
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, params, create_graph=True)
                vs = [(torch.randint(0, 2, g.shape, generator=gen) * 2 - 1).to(g) for g in grads]
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs)
                for m, v, hv in zip(mods, vs, hvs):
                    diag[m] += (v * hv).detach()
            model.train(was_training)
        n = max(len(batches), 1)
        return Scores(weight={m: 0.5 * (diag[m] / n).clamp_min(0) * m.weight.detach() ** 2 for m in mods})


@register_criterion
class Sensitivity(Criterion):
    """First-order Taylor saliency (Molchanov et al. 2017/2019): ``|w * dL/dw|``."""

    name = "sensitivity"
    needs_data = True

    def scores(self, model, layers, batches, device) -> Scores:
        mods = _weight_params(layers)
        acc = {m: torch.zeros_like(m.weight) for m in mods}

        def accumulate() -> None:
            for m in mods:
                acc[m] += (m.weight.detach() * m.weight.grad.detach()).abs()

        _grad_pass(model, batches, device, accumulate)
        return Scores(weight={m: acc[m] / max(len(batches), 1) for m in mods})


def _record(model: nn.Module, modules: Iterable[nn.Module], batches: Batches, device: str,
            fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], None]) -> None:
    """Forward the batches with a hook ``fn(module, input, output)`` on ``modules``."""
    handles = [m.register_forward_hook(lambda mod, inp, out: fn(mod, inp[0].detach(), out.detach()))
               for m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@register_criterion
class APoZ(Criterion):
    """Network trimming (Hu et al. 2016): channels whose ReLU outputs are mostly zero go first.
    The activation is taken after the layer's BatchNorm when one follows it."""

    name = "apoz"
    granularities = ("structured",)
    why_not = {"unstructured": "APoZ measures a channel's activations, which no single weight owns"}
    needs_data = True

    def scores(self, model, layers, batches, device) -> Scores:
        layer_set = set(layers.values())
        follows: dict[nn.Module, nn.Module] = {}  # BN -> the layer that ran just before it
        order: list[nn.Module] = []

        def track(mod, inp, out) -> None:
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and order and order[-1] in layer_set:
                follows.setdefault(mod, order[-1])
            order.append(mod)

        watch = [m for m in model.modules() if m in layer_set or isinstance(m, nn.modules.batchnorm._BatchNorm)]
        _record(model, watch, batches[:1], device, track)
        source = {layer: layer for layer in layer_set}
        for bn, layer in follows.items():
            source[layer] = bn
        zeros: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}
        by_source = {s: layer for layer, s in source.items()}

        def measure(mod, inp, out) -> None:
            layer = by_source[mod]
            flat = out.transpose(0, 1).reshape(out.shape[1], -1)
            zeros[layer] = zeros.get(layer, 0) + (flat <= 0).sum(1).float()
            counts[layer] = counts.get(layer, 0) + flat.shape[1]

        _record(model, list(by_source), batches, device, measure)
        return Scores(out_channel={layer: 1.0 - zeros[layer] / counts[layer] for layer in zeros})


def _consumer_inputs(mod: nn.Module, inp: torch.Tensor, positions: int, gen: torch.Generator,
                     take: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(samples, in_channels, k) rows of a consumer's input (unfolded patches for convs, at
    ``positions`` sampled output positions per image, or at ``take``), and the positions."""
    if isinstance(mod, nn.Linear):
        return inp.reshape(-1, inp.shape[-1], 1), None
    cols = nn.functional.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # N, C*k, L
    n, ck, length = cols.shape
    if take is None:
        take = torch.randperm(length, generator=gen)[:positions]
    cols = cols[:, :, take].permute(0, 2, 1).reshape(-1, ck)
    return cols.reshape(cols.shape[0], mod.in_channels, -1), take


def _consumer_weight(mod: nn.Module) -> torch.Tensor:
    """(out, in_channels, k) view of a consumer's weight."""
    w = mod.weight.detach()
    return w.reshape(w.shape[0], w.shape[1], -1)


def _is_plain_consumer(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)


@register_criterion
class Regression(Criterion):
    """ThiNet (Luo et al. 2017): rank a layer's input channels by how little the layer's
    output changes without them (greedy, on calibration data), prune the producers of the
    least useful ones, then refit each consumer's remaining weights by least squares."""

    name = "regression"
    granularities = ("structured",)
    why_not = {"unstructured": "reconstruction selects whole input channels of the next layer"}
    needs_data = True
    positions = 16  # sampled output positions per image for conv consumers

    def _rows(self, model, layers, batches, device):
        consumers = [m for m in layers.values() if _is_plain_consumer(m)]
        rows: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in consumers}
        gen = torch.Generator().manual_seed(0)
        _record(model, consumers, batches, device,
                lambda mod, inp, out: rows[mod].append(_consumer_inputs(mod, inp, self.positions, gen)[0]))
        return {m: torch.cat(r) for m, r in rows.items() if r}

    def scores(self, model, layers, batches, device) -> Scores:
        scores: dict[nn.Module, torch.Tensor] = {}
        for mod, x in self._rows(model, layers, batches, device).items():
            w = _consumer_weight(mod)  # O, C, k
            # contribution of channel c to output o for sample s: sum_k x[s,c,k] w[o,c,k]
            contrib = torch.einsum("sck,ock->sco", x, w)  # S, C, O
            gram = torch.einsum("sco,sdo->cd", contrib, contrib) / contrib.shape[0]  # C x C
            scores[mod] = _greedy_thinet(gram.cpu()).to(w.device)
        return Scores(in_channel=scores)

    def before_prune(self, model, layers, batches, device) -> dict:
        """Record each consumer's original output (without bias) at sampled positions: the
        refit targets."""
        targets: dict[str, list[torch.Tensor]] = {}
        takes: dict[str, list[torch.Tensor | None]] = {}
        names = {m: n for n, m in model.named_modules()}
        gen = torch.Generator().manual_seed(1)

        def keep(mod, inp, out) -> None:
            x, take = _consumer_inputs(mod, inp, self.positions, gen)
            targets.setdefault(names[mod], []).append(torch.einsum("sck,ock->so", x, _consumer_weight(mod)))
            takes.setdefault(names[mod], []).append(take)

        consumers = [m for m in layers.values() if _is_plain_consumer(m)]
        _record(model, consumers, batches, device, keep)
        return {"targets": {k: torch.cat(v) for k, v in targets.items()}, "takes": takes}

    @torch.no_grad()
    def after_prune(self, model, state, batches, device) -> None:
        """Refit consumers one by one in execution order, each on the inputs that the
        already refitted layers before it produce (ThiNet's layer-by-layer order)."""
        modules = dict(model.named_modules())
        pruned_out = state.get("pruned_out", {})
        for name, y in state.get("targets", {}).items():  # insertion order = execution order
            mod = modules.get(name)
            if mod is None or not _is_plain_consumer(mod):
                continue
            takes = iter(state["takes"][name])
            parts: list[torch.Tensor] = []
            _record(model, [mod], batches, device,
                    lambda m, inp, out: parts.append(_consumer_inputs(m, inp, 0, None, next(takes))[0]))
            x = torch.cat(parts).flatten(1)  # S, C'*k
            if x.shape[1] >= x.shape[0]:
                continue  # too few calibration rows for a well-posed refit
            if y.shape[1] != mod.weight.shape[0]:  # this consumer lost outputs too: keep their targets only
                removed = set(pruned_out.get(name, []))
                if y.shape[1] - len(removed) != mod.weight.shape[0]:
                    continue  # should not happen: the pruner reports every layer's removed outputs
                y = y[:, [i for i in range(y.shape[1]) if i not in removed]]
            gram = x.T @ x
            ridge = 1e-3 * gram.diagonal().mean() * torch.eye(x.shape[1], device=x.device)
            w = torch.linalg.solve(gram + ridge, x.T @ y)  # C'*k, O
            mod.weight.copy_(w.T.reshape(mod.weight.shape))


def _greedy_thinet(gram: torch.Tensor) -> torch.Tensor:
    """Greedy ThiNet selection on the contribution Gram matrix.

    Channels are removed one by one, each time the one whose removal adds least to the
    squared reconstruction error ``1' G_TT 1``. A channel's score is the relative error
    (fraction of the output energy) reached when it is removed, made monotone along the
    greedy order, so the ranking within a layer is the greedy order and scores compare
    across layers."""
    c = gram.shape[0]
    total = gram.sum().clamp_min(1e-12)
    removed = torch.zeros(c, dtype=torch.bool)
    cross = torch.zeros(c, dtype=gram.dtype)  # 2 * sum_{t in T} G[c, t]
    error = torch.zeros((), dtype=gram.dtype)
    running = torch.zeros((), dtype=gram.dtype)
    score = torch.empty(c, dtype=gram.dtype)
    diag = gram.diagonal()
    for k in range(c):
        increase = diag + cross
        increase[removed] = float("inf")
        pick = int(torch.argmin(increase))
        error = error + increase[pick]
        running = torch.maximum(running, error / total)  # monotone: the greedy order is the ranking
        score[pick] = running + k * 1e-9
        removed[pick] = True
        cross += 2 * gram[:, pick]
    return score
