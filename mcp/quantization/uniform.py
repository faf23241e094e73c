"""Uniform (fixed-point) quantization: ranges, observers, fake quantization with a
straight-through estimator, and a simulator that attaches it to a model's layers.

Weights are quantized per output channel (or per tensor) from their own min/max;
activations (the inputs of each quantized layer, optional) per tensor from an observer
calibrated on training batches, or from a running min/max during quantization-aware
training. Zeros stay exactly zero: symmetric grids contain 0 and asymmetric ones put it
on an integer zero point, and a pruned model's zero pattern is kept by a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from mcp.quantization.names import OBSERVERS  # noqa: F401 - engine reads them here

PERCENTILE = 99.99
SAMPLE_PER_BATCH = 200_000  # activation values kept per calibration batch and layer


def qrange(bits: int, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range of a grid: narrow symmetric [-(2^(b-1)-1), 2^(b-1)-1] or [0, 2^b-1];
    ``reduce_range``: ONNX Runtime's reduced symmetric INT8 range [-64, 64]."""
    if reduce_range and symmetric and bits == 8:
        return -64, 64
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
            reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero point) of a range; the range always includes 0."""
    qmin, qmax = qrange(bits, symmetric, reduce_range)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.clamp(scale, min=torch.finfo(torch.float32).tiny * 2 ** 30)
    if not symmetric:
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale.float(), zero.to(torch.int32)


def channel_minmax(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if per_channel:
        flat = w.detach().reshape(w.shape[0], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values
    return w.detach().min(), w.detach().max()


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
                 axis: int | None, reduce_range: bool = False) -> torch.Tensor:
    """Integers of ``x`` on the grid, computed as torch's fake quantization does
    (``x * (1 / scale)``, round half to even)."""
    qmin, qmax = qrange(bits, symmetric, reduce_range)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero = scale.view(shape), zero.view(shape)
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero, qmin, qmax).to(torch.int64)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
               axis: int | None, reduce_range: bool = False) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (zero outside the range)."""
    qmin, qmax = qrange(bits, symmetric, reduce_range)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, qmin, qmax)


class WeightQuantizer(nn.Module):
    """Parametrization: weight -> its fake-quantized value (times the zero mask)."""

    def __init__(self, bits: int, symmetric: bool, per_channel: bool, mask: torch.Tensor | None = None,
                 reduce_range: bool = False):
        super().__init__()
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        self.reduce_range = reduce_range
        self.register_buffer("mask", mask)

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*channel_minmax(w, self.per_channel), self.bits, self.symmetric, self.reduce_range)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams(w)
        q = fake_quant(w, scale, zero, self.bits, self.symmetric, 0 if self.per_channel else None,
                       self.reduce_range)
        return q * self.mask if self.mask is not None else q


def observe_range(samples: torch.Tensor, observer: str, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation range from calibration samples. ``entropy`` (ONNX Runtime's KL
    calibration) is approximated here by the range of least quantization MSE."""
    x = samples.detach().float().flatten()
    lo, hi = x.min(), x.max()
    if observer == "minmax":
        return lo, hi
    if x.numel() > 1_000_000:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    if observer == "percentile":
        q = torch.quantile(x, torch.tensor([1 - PERCENTILE / 100, PERCENTILE / 100]))
        return torch.minimum(q[0], torch.tensor(0.0)), q[1]
    best, best_err = (lo, hi), float("inf")
    for frac in torch.linspace(0.3, 1.0, 36):
        clo, chi = lo * frac, hi * frac
        scale, zero = qparams(clo, chi, bits, symmetric)
        err = torch.mean((fake_quant(x, scale, zero, bits, symmetric, None) - x) ** 2).item()
        if err < best_err:
            best, best_err = (clo, chi), err
    return best


class ActQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input.

    Modes: ``calibrate`` collects samples, ``train`` tracks a running min/max (EMA,
    quantization-aware training), ``dynamic`` takes each batch's own min/max (dynamic
    quantization), ``fixed`` uses the calibrated range."""

    def __init__(self, bits: int, symmetric: bool = False, observer: str = "minmax", momentum: float = 0.01):
        super().__init__()
        self.bits, self.symmetric, self.observer, self.momentum = bits, symmetric, observer, momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.mode, self.samples, self.initialised = "fixed", [], False

    def finish_calibration(self) -> None:
        if self.samples:
            lo, hi = observe_range(torch.cat(self.samples), self.observer, self.bits, self.symmetric)
            self.lo.fill_(float(lo)), self.hi.fill_(float(hi))
            self.initialised = True
        self.samples, self.mode = [], "fixed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            flat = x.detach().flatten()
            # min and max are exact; the distribution for percentile/entropy is subsampled
            self.samples.append(torch.stack([flat.min(), flat.max()]).cpu())
            if self.observer != "minmax" and flat.numel() > SAMPLE_PER_BATCH:
                flat = flat[torch.randint(0, flat.numel(), (SAMPLE_PER_BATCH,), device=flat.device)]
            if self.observer != "minmax":
                self.samples.append(flat.cpu())
            return x
        if self.mode == "dynamic":
            lo, hi = x.detach().min(), x.detach().max()
        else:
            if self.mode == "train" and self.training:
                lo_b, hi_b = x.detach().min(), x.detach().max()
                with torch.no_grad():
                    if not self.initialised:
                        self.lo.copy_(lo_b), self.hi.copy_(hi_b)
                        self.initialised = True
                    else:
                        self.lo.lerp_(lo_b, self.momentum), self.hi.lerp_(hi_b, self.momentum)
            if not self.initialised:
                return x
            lo, hi = self.lo, self.hi
        scale, zero = qparams(lo, hi, self.bits, self.symmetric)
        return fake_quant(x, scale.to(x.device), zero.to(x.device), self.bits, self.symmetric, None)


@dataclass
class LayerQuant:
    """How one layer is quantized."""

    bits: int
    act_bits: int = 0  # 0: float activations


@dataclass
class QuantSim:
    """Fake quantization attached to a model's conv/linear layers (parametrizations for
    weights, forward pre-hooks for inputs); :meth:`bake` writes the quantized weights
    into plain parameters and removes everything it attached."""

    model: nn.Module
    layers: Mapping[str, nn.Module]
    plan: Mapping[str, LayerQuant]
    symmetric: bool = True
    per_channel: bool = True
    act_symmetric: bool = False
    observer: str = "minmax"
    keep_zeros: bool = True
    reduce_range: bool = False
    act: dict[str, ActQuantizer] = field(default_factory=dict)
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, module in self.layers.items():
            lq = self.plan[name]
            mask = (module.weight.detach() != 0).float() if self.keep_zeros else None
            if mask is not None and bool(mask.all()):
                mask = None
            parametrize.register_parametrization(
                module, "weight", WeightQuantizer(lq.bits, self.symmetric, self.per_channel, mask, self.reduce_range))
            if lq.act_bits:
                quantizer = ActQuantizer(lq.act_bits, self.act_symmetric, self.observer).to(module.weight.device)
                self.act[name] = quantizer
                self._hooks.append(module.register_forward_pre_hook(
                    lambda mod, args, q=quantizer: (q(args[0]), *args[1:])))

    def set_mode(self, mode: str) -> None:
        for q in self.act.values():
            q.mode = mode

    @torch.no_grad()
    def calibrate(self, batches, device: str) -> None:
        """Fix activation ranges from calibration batches with the observer."""
        if not self.act:
            return
        self.set_mode("calibrate")
        was_training = self.model.training
        self.model.eval()
        for x, _ in batches:
            self.model(x.to(device))
        for q in self.act.values():
            q.finish_calibration()
        self.model.train(was_training)

    @torch.no_grad()
    def integers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(integers, scale, zero point) of every quantized weight, as the grid stores them."""
        out = {}
        for name, module in self.layers.items():
            quantizer: WeightQuantizer = module.parametrizations.weight[0]
            latent = module.parametrizations.weight.original
            scale, zero = quantizer.qparams(latent)
            q = quantize_int(latent, scale, zero, quantizer.bits, self.symmetric, 0 if self.per_channel else None,
                             self.reduce_range)
            if quantizer.mask is not None:  # masked weights are the zero point (value 0)
                zshape = [-1] + [1] * (q.dim() - 1) if self.per_channel else []
                q = torch.where(quantizer.mask.bool(), q, zero.view(zshape).to(q.dtype) if zshape else zero.to(q.dtype))
            out[name] = (q, scale, zero)
        return out

    def bake(self) -> None:
        """Replace each parametrized weight by its quantized value; remove hooks."""
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
