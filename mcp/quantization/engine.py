"""The quantization verb: ``Quantizer(model, input_shape, QuantSpec)`` attaches a method
to a model's conv/linear layers; ``finish()`` writes the quantized weights into plain
parameters and returns their encodable form (for the honest compressed size)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mcp.errors import ConfigError
from mcp.pruning.pruner import layers_in_order
from mcp.quantization.codec import Codebook, Uniform, encode, inference_state
from mcp.quantization.kmeans import KMEANS_INITS, WeightSharing
from mcp.quantization.methods import QuantMethod, quant_method
from mcp.quantization.uniform import OBSERVERS, LayerQuant, QuantSim

MIN_BITS, MAX_BITS = 2, 8
PRECISIONS = ("int8", "speed")


@dataclass(frozen=True)
class QuantSpec:
    method: str
    bits: int = 0  # 0: the method's default_bits (by layer kind)
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    act_bits: int = 0
    symmetric: bool = True
    per_channel: bool = True
    observer: str = "minmax"
    kmeans_init: str = "linear"
    ignored_layers: tuple[str, ...] = ()
    share_biases: bool | str = False  # k-means methods and codebook layers: biases get their own codebooks too;
    # "auto": where they pay
    reduce_range: bool = True  # INT8 methods: ONNX Runtime's [-64, 64] weights (no u8s8 saturation on AVX2)
    precision: str = "int8"  # ptq_int8: "int8" every layer, "speed" INT8 only where it runs faster than float32
    seed: int = 0
    # grid methods (fixed_point, qat): layers given a k-means codebook of 2^bits centroids instead of a uniform
    # grid (centroids fine-tuned, labels fixed), their indices and sparse positions entropy coded where it pays
    codebook_layers: tuple[str, ...] = ()

    @property
    def kind(self) -> QuantMethod:
        """The registered method (:mod:`mcp.quantization.methods`)."""
        return quant_method(self.method)

    @property
    def coding(self) -> str:
        return self.kind.coding

    def codings(self, entries: Mapping[str, Any]) -> str | dict[str, str]:
        """How each quantized tensor is encoded: the method's coding, except that codebook
        layers of a grid method are Huffman-coded where it pays (their labels and zeros do
        not move while their centroids are fine-tuned, so their size before fine-tuning is
        their size after)."""
        if not self.codebook_layers:
            return self.coding
        return {key: "huffman" if isinstance(e, Codebook) else self.coding for key, e in entries.items()}

    def validate(self) -> None:
        kind = self.kind  # an unknown name fails here
        if self.bits != 0 and not (isinstance(self.bits, int) and MIN_BITS <= self.bits <= MAX_BITS):
            raise ConfigError(f"bits={self.bits!r} is outside the allowed bit-widths {MIN_BITS}-{MAX_BITS} "
                              f"(0: the method's default)")
        if self.share_biases not in (True, False, "auto"):
            raise ConfigError(f"share_biases={self.share_biases!r} is not allowed; use true, false or auto")
        for layer, b in self.layer_bits.items():
            if not (isinstance(b, int) and MIN_BITS <= b <= MAX_BITS):
                raise ConfigError(f"bits of layer {layer}={b!r} is outside the allowed bit-widths {MIN_BITS}-{MAX_BITS}")
        if self.act_bits and not MIN_BITS <= self.act_bits <= MAX_BITS:
            raise ConfigError(f"act_bits={self.act_bits!r} must be 0 (float activations) or {MIN_BITS}-{MAX_BITS}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if self.kmeans_init not in KMEANS_INITS:
            raise ConfigError(f"unknown kmeans_init {self.kmeans_init!r}; choose one of {', '.join(KMEANS_INITS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not allowed; choose one of: {', '.join(PRECISIONS)}")
        if self.precision == "speed" and self.method != "ptq_int8":
            raise ConfigError(f"precision=speed (INT8 where it runs faster) is for method ptq_int8, not {self.method}")
        if kind.int8_only and (self.bits not in (0, 8) or self.layer_bits):
            raise ConfigError(f"method {self.method} is 8-bit; use fixed_point or qat for other bit-widths")
        if self.codebook_layers and (kind.shares_weights or kind.int8_only or kind.linear_only):
            raise ConfigError(f"codebook layers ({', '.join(self.codebook_layers)}) mix k-means codebooks into a "
                              f"grid method (fixed_point, qat), not {self.method}")


BIAS_SHARE_THRESHOLD = 0.05  # share_biases="auto": when float32 biases would exceed 5% of the weights' bits


def biases_pay(layers: Mapping[str, nn.Module], bits: Mapping[str, int]) -> bool:
    """Whether giving biases codebooks of their own pays: their float32 bits against an
    estimate of the encoded weights (bits per non-zero weight, plus a 4-bit relative index
    per entry where a layer is sparse, as Deep Compression stores them)."""
    weight_bits = bias_bits = 0.0
    for name, module in layers.items():
        nonzero = int(torch.count_nonzero(module.weight.detach()))
        sparse = nonzero < 0.5 * module.weight.numel()
        weight_bits += nonzero * (bits[name] + (4 if sparse else 0))
        if module.bias is not None:
            bias_bits += 32 * module.bias.numel()
    return bias_bits > BIAS_SHARE_THRESHOLD * weight_bits


class Quantizer:
    def __init__(self, model: nn.Module, input_shape: Sequence[int], spec: QuantSpec):
        spec.validate()
        self.model, self.spec = model, spec
        ordered = layers_in_order(model, input_shape)
        self.order = [n for n, _ in ordered]
        unknown = sorted((set(spec.layer_bits) | set(spec.ignored_layers) | set(spec.codebook_layers))
                         - set(self.order))
        if unknown:
            raise ConfigError(f"unknown layer(s) {', '.join(unknown)}; this model's layers are: "
                              f"{', '.join(self.order)}")
        layers = {n: m for n, m in ordered if n not in spec.ignored_layers}
        kind = spec.kind
        if kind.linear_only:  # e.g. run-time activation quantization of the fully connected layers
            layers = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
        if not layers:
            raise ConfigError(f"no layer to quantize with {spec.method} (ignored: {', '.join(spec.ignored_layers)})")
        self.layers = layers
        conv_bits, fc_bits = kind.default_bits
        self.bits = {n: spec.layer_bits.get(n, spec.bits or (fc_bits if isinstance(m, nn.Linear) else conv_bits))
                     for n, m in layers.items()}
        self.sim: QuantSim | None = None
        self.sharing: WeightSharing | None = None
        shared = layers if kind.shares_weights else {n: m for n, m in layers.items() if n in spec.codebook_layers}
        # biases get codebooks of their own only in layers that share weights (a grid layer's stay float32)
        self.share_biases = bool(shared) and (
            biases_pay(shared, self.bits) if spec.share_biases == "auto" else bool(spec.share_biases))
        grid = {n: m for n, m in layers.items() if n not in shared}
        if shared:
            self.sharing = WeightSharing(shared, {n: self.bits[n] for n in shared}, spec.kmeans_init, spec.seed,
                                         self.share_biases)
        if grid:  # uniform grids; INT8 methods fix the scheme ONNX Runtime's kernels use
            act = 8 if kind.int8_only else spec.act_bits
            plan = {n: LayerQuant(self.bits[n], act) for n in grid}
            self.sim = QuantSim(model, grid, plan, symmetric=kind.int8_only or spec.symmetric,
                                per_channel=kind.int8_only or spec.per_channel, observer=spec.observer,
                                reduce_range=spec.reduce_range and kind.int8_only)
            self.sim.set_mode(kind.sim_mode)

    def calibrate(self, batches, device: str) -> None:
        """Static activation ranges (ptq_int8, fixed_point with act_bits) from calibration batches."""
        if self.sim is not None and self.spec.kind.calibrates:
            self.sim.calibrate(batches, device)

    def freeze(self) -> None:
        """After QAT: activations use the ranges tracked during training."""
        if self.sim is not None and self.spec.kind.sim_mode == "train":
            self.sim.set_mode("fixed")

    @torch.no_grad()
    def finish(self) -> dict[str, Codebook | Uniform]:
        """Bake the quantized weights; return ``state_dict key -> encodable weight``."""
        entries: dict[str, Codebook | Uniform] = {}
        if self.sharing is not None:
            for key, (centroids, labels, mask) in self.sharing.codebooks().items():
                entries[key] = Codebook(centroids.cpu().numpy().astype(np.float32),
                                                     labels.cpu().numpy(), mask.cpu().numpy())
            self.sharing.bake()
        if self.sim is not None:
            for name, (q, scale, zero) in self.sim.integers().items():
                entries[f"{name}.weight"] = Uniform(q.cpu().numpy(), scale.cpu().numpy().reshape(-1),
                                                    zero.cpu().numpy().reshape(-1), self.bits[name],
                                                    self.sim.symmetric, 0 if self.sim.per_channel else -1)
            self.sim.bake()
        return entries

    def float_layers(self) -> list[int]:
        """Indices (in execution order) of the layers left in float32 (ignored)."""
        return [i for i, name in enumerate(self.order) if name not in self.layers]

    def signed_integers(self, entries: Mapping[str, Codebook | Uniform]) -> list[np.ndarray | None]:
        """Per layer in execution order: ``q - zero`` for uniform weights that fit INT8, else None."""
        out: list[np.ndarray | None] = []
        for name in self.order:
            e = entries.get(f"{name}.weight")
            if not isinstance(e, Uniform):
                out.append(None)
                continue
            shape = [1] * e.q.ndim
            if e.axis >= 0:
                shape[e.axis] = -1
            ints = e.q - e.zero.reshape(shape)
            out.append(ints if np.abs(ints).max(initial=0) <= 127 else None)
        return out

    def describe(self) -> dict[str, Any]:
        """For the recipe and the run: method, scheme and per-layer bits."""
        codebooks = [n for n in self.order if n in self.spec.codebook_layers and n in self.layers]
        return {"method": self.spec.method, "bits": dict(self.bits), "act_bits": self.spec.act_bits,
                "share_biases": self.share_biases,
                "symmetric": self.spec.symmetric, "per_channel": self.spec.per_channel,
                "observer": self.spec.observer, "coding": self.spec.coding, "reduce_range": self.spec.reduce_range,
                **({"codebook_layers": codebooks, "kmeans_init": self.spec.kmeans_init} if codebooks else {})}


def simulated(model: nn.Module, input_shape: Sequence[int], quantization: Mapping[str, Any],
              batches=()) -> nn.Module:
    """A copy of a quantized model (as registered: weights baked on their grid) with its
    activation quantization simulated again, from the description in its recipe: the
    PyTorch counterpart of an INT8 ONNX model. Static ranges are recalibrated on
    ``batches`` (the same batches the quantize stage used give the same ranges, because
    re-quantizing baked weights leaves them unchanged)."""
    import copy

    codebooks = set(quantization.get("codebook_layers", ()))  # their baked values are no grid's: left as they are
    bits = {str(k): int(v) for k, v in quantization["bits"].items() if str(k) not in codebooks}
    if not bits:  # every layer a codebook: nothing on a grid to simulate
        return copy.deepcopy(model).cpu().eval()
    order = [n for n, _ in layers_in_order(model, input_shape)]
    int8 = quant_method(quantization["method"]).int8_only
    spec = QuantSpec(method=quantization["method"], bits=8 if int8 else max(bits.values()),
                     layer_bits={} if int8 else bits,
                     act_bits=int(quantization.get("act_bits", 0)), symmetric=bool(quantization["symmetric"]),
                     per_channel=bool(quantization["per_channel"]), observer=quantization["observer"],
                     reduce_range=bool(quantization.get("reduce_range", True)),
                     ignored_layers=tuple(n for n in order if n not in bits))
    sim = copy.deepcopy(model).cpu().eval()
    quantizer = Quantizer(sim, input_shape, spec)
    quantizer.calibrate(batches, "cpu")
    quantizer.freeze()
    return sim.eval()


def layer_table(model: nn.Module, entries: Mapping[str, Codebook | Uniform], bits: Mapping[str, int],
                coding: str | Mapping[str, str]) -> list[dict[str, Any]]:
    """Per quantized tensor (a layer's weight, or its bias when shared): bits, params,
    non-zeros, distinct values, fp32 and encoded bytes (each tensor encoded alone, so
    the bytes are real)."""
    state = inference_state(model)
    header = len(encode([], "fixed"))
    rows = []
    for key, entry in entries.items():
        how = coding if isinstance(coding, str) else coding.get(key, "fixed")
        layer, param = key.rsplit(".", 1)
        w = state[key]
        nonzero = w[w != 0]
        rows.append({"layer": layer if param == "weight" else key, "param": param, "bits": bits[layer],
                     "params": w.numel(), "nonzero": int(nonzero.numel()),
                     "distinct_nonzero": int(torch.unique(nonzero).numel()), "bytes_fp32": 4 * w.numel(),
                     "bytes_compressed": len(encode([entry], how)) - header})
    return rows
