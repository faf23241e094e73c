"""One search trial's model: prune with per-layer ratios (one-shot, or while it trains in
float32 on a gradual or iterative schedule), size it by encoding its quantized form
(before any quantization-aware training is spent on it), fine-tune it with QAT at the
per-layer bit-widths, and encode the result."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mcp.config import PruneConfig
from mcp.deploy.deployable import grid_onnx, speed_onnx
from mcp.deploy import runtimes
from mcp.evaluation.benchmark import measure_onnx
from mcp.pruning import PruneSpec, Pruning
from mcp.pruning.depth import cached_block_order
from mcp.pruning.engine import PruningCallback
from mcp.pruning.schedules import event_steps
from mcp.quantization import Quantizer, QuantSpec, encode_model
from mcp.training import Callback, Trainer, build_optimizer, build_scheduler
from mcp.tuner.space import TrialConfig, first_prune_lr, first_schedule, least_heads

GRADUAL_STEPS = 10  # pruning events of a gradual or iterative trial (the prune stage's default)
# weight decay while a trial prunes as it trains: the prune stage's, and so Deep Compression's
PRUNE_WEIGHT_DECAY = PruneConfig.defaults()["weight_decay"]


@dataclass
class Finetuned:
    model: nn.Module  # weights baked on their grids
    payload: bytes  # the encoded (compressed) form
    quantizer: Any
    entries: dict[str, Any]
    calib: Sequence | None = None  # set: deployed for speed (a latency budget), calibrated on these batches

    def onnx(self, input_shape: Sequence[int], out_dir: str | Path, opset: int = 17,
             runtime: str = "onnxruntime") -> tuple[Path, str]:
        """(file, format) of its deployable; deployed for speed, the INT8 layers are those
        that ``runtime`` runs faster (the grid deployable is the same file everywhere)."""
        if self.calib is not None:
            return speed_onnx(self.model, input_shape, self.calib, out_dir, opset, runtime)
        return grid_onnx(self.model, input_shape, self.quantizer, self.entries, out_dir, opset)


def deployed_latency(model: nn.Module, input_shape: Sequence[int], calib: Sequence, seconds: float = 0.5,
                     batch: int = 1, runtime: str = "onnxruntime") -> float:
    """CPU p50 (ms, one thread) of one call at ``batch`` images of ``model`` as a latency
    budget deploys it on ``runtime`` (:func:`mcp.deploy.deployable.speed_onnx`: INT8 where
    that runtime runs a layer faster), timed in a process of its own there (``auto``: the
    file of each available runtime in it, the fastest counts). Latency depends on the
    shapes, not on the weights' values: it is measured before any fine-tuning."""
    if runtime == "auto":
        return fastest_confirmed(lambda name: deployed_latency(model, input_shape, calib, seconds, batch, name))
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = speed_onnx(copy.deepcopy(model).cpu(), input_shape, calib, tmp, runtime=runtime)
        return onnx_latency(path, input_shape, seconds, batch, runtime)


def onnx_latency(path: str | Path, input_shape: Sequence[int], seconds: float = 0.5, batch: int = 1,
                 runtime: str = "onnxruntime") -> float:
    """CPU p50 (ms, one thread) of one call at ``batch`` images of an ONNX file, timed in
    a process of its own in ``runtime`` (``auto``: in each available runtime, the fastest
    counts): what a latency budget (``batch`` 1) or a throughput budget checks."""
    if runtime == "auto":
        return fastest_confirmed(lambda name: onnx_latency(path, input_shape, seconds, batch, name))
    if batch == 1:
        return float(measure_onnx(path, input_shape, "cpu", 1, batch=8, warmup=20, iters=100,
                                  seconds=seconds, runtime=runtime)["p50_ms"])
    return float(measure_onnx(path, input_shape, "cpu", 1, batch=batch, warmup=10, iters=10,
                              seconds=seconds, runtime=runtime)["batch_p50_ms"])


def fastest_confirmed(measure: Callable[[str], float]) -> float:
    """What ``auto`` counts: the least of ``measure(runtime)`` over the available runtimes,
    the fastest one measured twice and its slower time kept. The least of several noisy
    times is biased low (OpenVINO's bf16 timing of a small model is bimodal here: one
    process in six ran 1.5x slower), and a budget judged on a lucky time is not met later."""
    times = {name: measure(name) for name in runtimes.available()}
    best = min(times, key=times.get)
    if len(times) > 1:
        times[best] = max(times[best], measure(best))
    return min(times.values())


def extremes(space, fewest_bits: bool = True):
    """The configurations at the space's far end: every unit at its highest ratio and its
    fewest (or most) bits, at each granularity (and channel rounding) the space allows."""
    pick = min if fewest_bits else max
    bits = {n: pick(space.bits_of[u]) for u, members in space.units.items() for n in members}
    ratios = {n: space.ratio_of[u][1] for u, members in space.units.items() for n in members}
    encodings = {n: "codebook" if fewest_bits and "codebook" in space.encodings_of(u) else space.encodings_of(u)[0]
                 for u, members in space.units.items() for n in members}  # a codebook is the smaller
    for granularity in space.granularity:
        for round_to in space.round_to if granularity == "structured" else (1,):
            yield TrialConfig(ratios, bits, granularity, space.criterion[0], space.epochs[0], space.lr[0], round_to,
                              space.drop_blocks[1], least_heads(space, most=True), encodings, space.kmeans_init[0],
                              *first_schedule(space), fewest_bits and True in space.share_biases,
                              first_prune_lr(space))


def smallest_latency(base: nn.Module, input_shape: Sequence[int], space, calib, device: str, batch: int = 1,
                     runtime: str = "onnxruntime") -> float:
    """The lowest latency the space can reach (a latency budget below it is unreachable)."""
    return min(deployed_latency(prune_candidate(base, input_shape, tc, calib, device), input_shape, calib, batch=batch,
                                runtime=runtime)
               for tc in extremes(space, fewest_bits=False))


def prune_candidate(base: nn.Module, input_shape: Sequence[int], tc: TrialConfig, calib, device: str) -> nn.Module:
    """A copy of ``base`` pruned once: its ``tc.drop_blocks`` least important blocks removed
    (ranked once per starting model and calibration batches), then layer by layer to
    ``tc.ratios`` (the ratios of layers in removed blocks are moot)."""
    blocks = cached_block_order(base, input_shape, calib, tc.drop_blocks) if tc.drop_blocks else []
    model = copy.deepcopy(base).to(device)
    spec = PruneSpec(criterion=tc.criterion, scope="layerwise", granularity=tc.granularity, schedule="one_shot",
                     sparsity=0.0, ratios=dict(tc.ratios), round_to=tc.round_to if tc.granularity == "structured" else 1,
                     blocks=tuple(blocks), head_ratios=dict(tc.heads))
    Pruning(model, input_shape, spec, calib, device).step()
    return model


def prune_while_training(base: nn.Module, input_shape: Sequence[int], tc: TrialConfig, loaders, calib,
                         device: str, seed: int = 0, batch_loss=None, epochs: int | None = None) -> nn.Module:
    """A copy of ``base`` pruned to ``tc.ratios`` on ``tc.schedule`` (gradual: Zhu and
    Gupta's cubic ramp; iterative: Han et al.'s equal steps) while it trains in float32 for
    ``epochs`` (default ``tc.prune_epochs``) at ``tc.prune_lr`` with the prune stage's weight
    decay (:data:`PRUNE_WEIGHT_DECAY`): the ratios are reached after
    half of them, in :data:`GRADUAL_STEPS` events, and the rest recovers. The first stage of
    Deep Compression, which at 97% sparsity on MNIST kept 95.3% where pruning at once kept
    89% after the same quantization-aware training (docs/results.md)."""
    epochs = tc.prune_epochs if epochs is None else epochs
    blocks = cached_block_order(base, input_shape, calib, tc.drop_blocks) if tc.drop_blocks else []
    model = copy.deepcopy(base).to(device)
    spec = PruneSpec(criterion=tc.criterion, scope="layerwise", granularity="unstructured", schedule=tc.schedule,
                     steps=GRADUAL_STEPS, sparsity=0.0, ratios=dict(tc.ratios), blocks=tuple(blocks))
    pruning = Pruning(model, input_shape, spec, calib, device)
    train_loader, val_loader, _ = loaders
    torch.manual_seed(seed)
    optimizer = build_optimizer(model, "sgd", tc.prune_lr or tc.lr, 0.9, True, PRUNE_WEIGHT_DECAY)
    span = len(train_loader) * max(1, epochs // 2)
    Trainer(model, optimizer, build_scheduler(optimizer, "cosine", epochs), train_loader, val_loader, epochs=epochs,
            device=device, seed=seed, restore_best=False,
            callbacks=[PruningCallback(pruning, event_steps(spec.events, span))], batch_loss=batch_loss).fit()
    return model


def top_up(model: nn.Module, input_shape: Sequence[int], space, tc: TrialConfig, budget: float, calib, device: str,
           seed: int = 0, on: str = "compressed") -> tuple[nn.Module, TrialConfig]:
    """``model`` as it is when its encoded size fits ``budget``, else pruned a little
    further at once (the least that fits, along :func:`fill_budget`'s line; the weights it
    already lost stay lost) with the ratios that took. A model pruned while it trained
    keeps other weights than the one-shot pruning its ratios were sized on, and its codes
    and gaps entropy-code to a slightly different size (about 1% more on MNIST)."""
    if compressed_size(model, input_shape, tc, seed, on) <= budget:
        return model, tc
    here = dataclasses.replace(tc, drop_blocks=0)  # blocks already removed stay removed, none more
    more = fill_budget(model, input_shape, space, here, budget, calib, device, seed, on=on)
    if more is None:
        return model, tc
    return prune_candidate(model, input_shape, more, calib, device), dataclasses.replace(more,
                                                                                        drop_blocks=tc.drop_blocks)


def present(tc: TrialConfig, model: nn.Module) -> TrialConfig:
    """``tc`` without the layers ``model`` no longer has (removed with their blocks)."""
    names = {n for n, _ in model.named_modules()}
    return dataclasses.replace(tc, ratios={n: r for n, r in tc.ratios.items() if n in names},
                               bits={n: b for n, b in tc.bits.items() if n in names})


def _spec(method: str, tc: TrialConfig, seed: int):
    """The trial's quantization: ``method``'s uniform grids at its bits (fixed-width codes:
    sizes before and after fine-tuning agree), k-means codebooks in its codebook layers
    (Huffman-coded where it pays: their labels and zeros do not move while the centroids
    train, so their size does not either), and their biases' own where ``tc.share_biases``."""
    bits = {n: b for n, b in tc.bits.items()}
    return QuantSpec(method=method, bits=max(bits.values()), layer_bits=bits, seed=seed,
                     codebook_layers=tuple(n for n in tc.codebook_layers if n in bits), kmeans_init=tc.kmeans_init,
                     share_biases=tc.share_biases)


def measure_sizes(model: nn.Module, input_shape: Sequence[int], tc: TrialConfig, seed: int = 0,
                  onnx: bool = False) -> dict[str, float]:
    """``size_bytes_compressed`` (the encoded payload) and, with ``onnx``,
    ``size_bytes_onnx`` (the deployable ONNX file: INT8 containers, pruned zeros stored
    densely, so only removed channels shrink it) of ``model`` quantized at ``tc.bits``,
    its weights as they are now (a copy is quantized, ``model`` is untouched)."""
    q = copy.deepcopy(model).cpu()
    spec = _spec("fixed_point", present(tc, q), seed)
    quantizer = Quantizer(q, input_shape, spec)
    entries = quantizer.finish()
    out = {"size_bytes_compressed": float(len(encode_model(q, entries, spec.codings(entries))))}
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            path, _ = grid_onnx(q, input_shape, quantizer, entries, tmp)
            out["size_bytes_onnx"] = float(path.stat().st_size)
    return out


def compressed_size(model: nn.Module, input_shape: Sequence[int], tc: TrialConfig, seed: int = 0,
                    on: str = "compressed") -> int:
    """Bytes of ``model`` quantized at ``tc.bits``, as ``on`` measures them (see
    :func:`measure_sizes`): ``compressed`` or ``onnx``."""
    sizes = measure_sizes(model, input_shape, tc, seed, onnx=on == "onnx")
    return int(sizes["size_bytes_onnx" if on == "onnx" else "size_bytes_compressed"])


def finetune_quantized(model: nn.Module, input_shape: Sequence[int], tc: TrialConfig, loaders, device: str,
                       seed: int = 0, report: Callable[[int, float], None] | None = None, batch_loss=None,
                       epochs: int | None = None, speed_calib: Sequence | None = None) -> Finetuned:
    """QAT at ``tc.bits`` for ``epochs`` (default ``tc.epochs``), zeros kept; ``report(epoch,
    val_accuracy)`` after each epoch (it may raise to stop the trial)."""
    train_loader, val_loader, _ = loaders
    epochs = tc.epochs if epochs is None else epochs
    torch.manual_seed(seed)
    spec = _spec("qat", present(tc, model), seed)
    quantizer = Quantizer(model, input_shape, spec)
    if epochs > 0:
        class Reporter(Callback):
            def on_epoch_end(self, trainer, epoch, logs):
                if report is not None:
                    report(epoch, logs["val_accuracy"])

        optimizer = build_optimizer(model, "sgd", tc.lr, 0.9, True, 0.0)
        trainer = Trainer(model, optimizer, build_scheduler(optimizer, "cosine", epochs), train_loader, val_loader,
                          epochs=epochs, device=device, seed=seed, restore_best=False, callbacks=[Reporter()],
                          batch_loss=batch_loss)
        trainer.fit()
    quantizer.freeze()
    entries = quantizer.finish()
    return Finetuned(model, encode_model(model, entries, spec.codings(entries)), quantizer, entries, speed_calib)


CLOSE_ENOUGH = 0.002  # a fit this close under the budget (a share of it) ends the search for the fit


def least_fitting(value: Callable[[float], float], lo: float, hi: float, budget: float, over_lo: float,
                  fits_hi: float, steps: int) -> float:
    """The smallest ``x`` in [lo, hi] whose ``value(x)`` is within ``budget``, the value
    falling as ``x`` grows, given ``value(lo) = over_lo > budget >= fits_hi = value(hi)``:
    by false position with the Illinois step (the size against a ratio is nearly straight,
    so a fit comes in three to five evaluations where halving the interval took ten), ending
    once the fitting end is within :data:`CLOSE_ENOUGH` of the budget or after ``steps``
    evaluations."""
    f_lo, f_hi, kept = over_lo - budget, fits_hi - budget, 0  # f_lo and f_hi as Illinois weighs them
    under = budget - fits_hi  # how far under the budget the fitting end is (not weighed)
    for _ in range(steps):
        if under <= CLOSE_ENOUGH * budget:
            break
        span = hi - lo
        x = min(max(hi - f_hi * span / (f_hi - f_lo), lo + span / 32), hi - span / 32)  # inside, not at an end
        f = value(x) - budget
        if f <= 0:
            hi, f_hi, under = x, f, -f
            f_lo, kept = (f_lo / 2 if kept == 1 else f_lo), 1  # the same end kept twice: Illinois halves it
        else:
            lo, f_lo = x, f
            f_hi, kept = (f_hi / 2 if kept == -1 else f_hi), -1
    return hi


def ratio_at_budget(base: nn.Module, input_shape: Sequence[int], config: Callable[[float], TrialConfig], lo: float,
                    hi: float, budget: float, calib, device: str, seed: int = 0, steps: int = 12,
                    on: str = "compressed", measure: Callable[[nn.Module], float] | None = None) -> float | None:
    """The smallest ratio ``r`` in [lo, hi] whose configuration ``config(r)`` fits
    ``budget`` (:func:`least_fitting`), on encoded sizes, or on what ``measure(pruned
    model)`` says (a latency): both fall as ``r`` grows. None when even ``hi`` is over."""
    def value(ratio: float) -> float:
        tc = config(ratio)
        model = prune_candidate(base, input_shape, tc, calib, device)
        return measure(model) if measure is not None else compressed_size(model, input_shape, tc, seed, on)

    at_hi = value(hi)
    if at_hi > budget:
        return None
    at_lo = value(lo)
    if at_lo <= budget:
        return lo
    return least_fitting(value, lo, hi, budget, at_lo, at_hi, steps)


def fill_budget(base: nn.Module, input_shape: Sequence[int], space, tc: TrialConfig, budget: float, calib,
                device: str, seed: int = 0, steps: int = 10, on: str = "compressed",
                measure: Callable[[nn.Module], float] | None = None) -> TrialConfig | None:
    """Move the sampled ratios along one line until the model just fits ``budget``: less
    pruning when it is under (scaling every ratio towards its range's low end), more when
    it is over (towards the high end). The sampled ratios then say how to share the
    pruning between layers, and every feasible trial spends the whole budget. None when
    even the highest ratios do not fit. ``budget`` is bytes as ``on`` measures them, or
    what ``measure(pruned model)`` returns (a latency)."""
    lows = {n: space.ratio_of[u][0] for u, members in space.units.items() for n in members}
    highs = {n: space.ratio_of[u][1] for u, members in space.units.items() for n in members}

    def at(t: float) -> TrialConfig:  # t in [-1, 1]: -1 the lows, 0 as sampled, 1 the highs
        edge = lows if t < 0 else highs
        ratios = {n: r + abs(t) * (edge[n] - r) for n, r in tc.ratios.items()}
        return dataclasses.replace(tc, ratios=ratios, bits=dict(tc.bits))

    def size(t: float) -> float:
        c = at(t)
        model = prune_candidate(base, input_shape, c, calib, device)
        return measure(model) if measure is not None else compressed_size(model, input_shape, c, seed, on)

    here = size(0.0)
    if here <= budget:  # fits: find the least pruning that still fits
        lowest = size(-1.0)
        if lowest <= budget:
            return at(-1.0)
        return at(least_fitting(size, -1.0, 0.0, budget, lowest, here, steps))
    highest = size(1.0)  # over: find the least extra pruning that fits
    if highest > budget:
        return None
    return at(least_fitting(size, 0.0, 1.0, budget, here, highest, steps))


def smallest_size(base: nn.Module, input_shape: Sequence[int], space, calib, device: str, seed: int = 0,
                  on: str = "compressed") -> int:
    """The smallest size the space can reach (a budget below it is unreachable)."""
    return min(compressed_size(prune_candidate(base, input_shape, tc, calib, device), input_shape, tc, seed, on)
               for tc in extremes(space))