"""The search's objective, apart from any tracking.

A trial samples per-layer ratios and bit-widths, moves the ratios until the model just
fits the budget (``fill_budget``), prunes a copy of the starting model (at once, or while
it trains in float32 on a gradual schedule, then a little further where that left it over
the budget), measures its encoded (or ONNX) size before any quantization-aware training,
rejects it there when it is over the budget, and otherwise fine-tunes it with QAT, reporting validation accuracy per epoch so that
Optuna's pruner can stop it. What a trial measures goes to a :class:`TrialLog` the caller
opens per trial: the stage makes each trial a nested MLflow run, the way Optuna's own
integrations do; the library default records nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Protocol

import torch

from mcp.deploy import ort_evaluate, ort_session, runtimes
from mcp.distillation import Distiller, DistillSpec
from mcp.evaluation.metrics import count_params, model_metrics, size_bytes_fp32
from mcp.pruning.depth import removed_blocks
from mcp.pruning.pruner import attention_modules
from mcp.training import evaluate
from mcp.tuner.space import (
    allowed_bits,
    clipped_ratio,
    head_span,
    sample,
    start_schedule,
    uniform,
    uniform_where_allowed,
)
from mcp.tuner.study import FILL_SLACK, SIZE_KEY, budget_excess, within_budget
from mcp.tuner.trial import (
    deployed_latency,
    fastest_confirmed,
    fill_budget,
    finetune_quantized,
    measure_sizes,
    onnx_latency,
    present,
    prune_candidate,
    prune_while_training,
    ratio_at_budget,
    top_up,
)

STATES = ("complete", "pruned", "infeasible", "failed")
LATENCY_KEY = "latency_ms_p50_cpu"  # a latency budget at batch 1 (and pareto's latency objective)
BATCH_LATENCY_KEY = "batch_latency_ms_p50_cpu"  # a latency budget at a larger batch: one call's p50
LATENCY_SLACK = 0.03  # a latency budget is filled to 3% below it: timing noise then rarely tips a trial over
START_ATTR = "start"  # user attribute of a starting trial: its kind ("uniform", or "global": Deep Compression's)
START_KINDS = ("global", "uniform")  # the order in which finalists' places go to the best start of each kind


class TrialLog(Protocol):
    """Where one trial's measurements go."""

    def metrics(self, values: dict[str, float], step: int | None = None) -> None: ...

    def state(self, state: str) -> None: ...


class NullLog:
    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        pass

    def state(self, state: str) -> None:
        pass


@contextlib.contextmanager
def no_log(trial) -> Iterator[TrialLog]:
    yield NullLog()


@dataclass
class SearchProblem:
    """Everything a trial needs: the space, the starting model and data, and the budget."""

    space: Any
    base: torch.nn.Module
    input_shape: tuple[int, ...]
    loaders: Any  # (train, val, test)
    device: str
    calib: list  # the pruning criteria's calibration batches, fixed for the whole study
    budget: float | None  # bytes, as ``budget_on`` measures them
    budget_on: str = "compressed"
    fill_budget: bool = True
    pareto: bool = False  # objectives (accuracy, size[, latency]) instead of accuracy alone
    latency: bool = False
    distill: bool = False  # fine-tune by distillation from the starting model
    seed: int = 0
    base_fp32: float = 0.0  # the starting model's float32 size, for compression ratios
    budget_ms: float = 0.0  # latency budget: CPU p50 (ms) of the model deployed for speed; 0: none
    budget_batch: int = 1  # the latency budget is that of one call at this many images
    runtime: str = "onnxruntime"  # where latencies are timed (mcp.deploy.runtimes; auto: the fastest counts)

    @classmethod
    def of(cls, cfg: Any, checked: Any, base: torch.nn.Module, input_shape, loaders, device: str) -> "SearchProblem":
        """The problem of a ``mcp search`` configuration (:class:`mcp.config.SearchConfig`),
        checked (:func:`mcp.tuner.study.check_search`), from the starting model ``base``."""
        return cls(checked.space, base, tuple(input_shape), loaders, device, checked.calib, checked.budget,
                   cfg.budget_on, cfg.fill_budget, cfg.mode == "pareto", cfg.latency, cfg.distill, cfg.seed,
                   float(size_bytes_fp32(base)), cfg.budget_ms, cfg.budget_batch, cfg.runtime)

    def within(self, metrics: Mapping[str, float]) -> bool:
        """Whether a model so measured meets the size budget and the latency budget."""
        return within_budget(metrics[SIZE_KEY[self.budget_on]], self.budget) and (
            not self.budget_ms or metrics[latency_key(self.budget_batch)] <= self.budget_ms)


def latency_key(budget_batch: int) -> str:
    """The metric a latency budget at ``budget_batch`` images per call is checked on."""
    return LATENCY_KEY if budget_batch == 1 else BATCH_LATENCY_KEY


def constrain(trial, key: str, excess: float) -> None:
    """Bytes over the budget (<= 0: within) as an Optuna constraint (set once per key) and
    as the user attribute ``budget_excess`` (the latest; what the table and older Optuna read)."""
    trial.set_user_attr("budget_excess", float(excess))
    if hasattr(trial, "set_constraint"):
        trial.set_constraint(key, float(excess))


def trial_latency(tuned, shape, runtime: str = "onnxruntime") -> float:
    """CPU p50 (ms) at batch 1, one thread, of the trial's deployable ONNX model built for
    ``runtime``, timed in a process of its own for at least half a second there (``auto``:
    in each available runtime, the fastest counts)."""
    if runtime == "auto":
        return fastest_confirmed(lambda name: trial_latency(tuned, shape, name))
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = tuned.onnx(shape, tmp, runtime=runtime)
        return onnx_latency(path, shape, 0.5, 1, runtime)


def teacher_of(p: SearchProblem):
    """With ``p.distill``: distillation from the starting model (T=4, alpha=0.9), for trials
    and winners alike; else None (cross-entropy)."""
    return Distiller(p.base, DistillSpec()).to(p.device) if p.distill else None


def prune_trial(p: SearchProblem, tc, batch_loss=None, prune_epochs: int = 0) -> tuple[torch.nn.Module, Any]:
    """The starting model pruned as ``tc`` says, and ``tc`` as it ran: one-shot, or while it
    trains on ``tc.schedule`` for ``prune_epochs`` (0: ``tc.prune_epochs``; ``batch_loss``
    distils) and then, under a size budget that trials fill, pruned a little further where
    it came out over it (:func:`mcp.tuner.trial.top_up`)."""
    if tc.schedule == "one_shot":
        model = prune_candidate(p.base, p.input_shape, tc, p.calib, p.device)
        return model, present(tc, model)
    if prune_epochs:
        tc = dataclasses.replace(tc, prune_epochs=prune_epochs)
    model = prune_while_training(p.base, p.input_shape, tc, p.loaders, p.calib, p.device, p.seed, batch_loss)
    tc = present(tc, model)
    if p.budget and p.fill_budget:
        model, tc = top_up(model, p.input_shape, p.space, tc, p.budget * (1 - FILL_SLACK), p.calib, p.device,
                           p.seed, p.budget_on)
    return model, tc


def make_objective(problem: SearchProblem, open_log: Callable[[Any], ContextManager[TrialLog]] = no_log
                   ) -> Callable[[Any], float | tuple[float, ...]]:
    """The function ``study.optimize`` calls: one trial, its measurements sent to the log
    ``open_log(trial)`` opens, its state kept in the trial's user attribute ``state``."""
    import optuna

    p = problem
    shape, on = p.input_shape, p.budget_on

    def set_state(trial, log: TrialLog, state: str) -> None:
        trial.set_user_attr("state", state)
        log.state(state)

    def objective(trial):
        tc = sample(trial, p.space)
        outcome: list[Any] = []
        with open_log(trial) as log:
            try:
                if p.budget and p.fill_budget:
                    target = p.budget * (1 - FILL_SLACK)
                    tc = fill_budget(p.base, shape, p.space, tc, target, p.calib, p.device, p.seed,
                                     on=on) or tc  # None: even the highest ratios are over; rejected below
                elif p.budget_ms and p.fill_budget and tc.granularity == "structured":  # on measured latency
                    # (removing single weights leaves a dense model's latency as it is: nothing to fill)
                    tc = fill_budget(p.base, shape, p.space, tc, p.budget_ms * (1 - LATENCY_SLACK), p.calib,
                                     p.device, p.seed, steps=6,
                                     measure=lambda model: deployed_latency(model, shape, p.calib,
                                                                            batch=p.budget_batch,
                                                                            runtime=p.runtime)) or tc
                trial.set_user_attr("ratios", tc.ratios)
                teacher = teacher_of(p)
                model, tc = prune_trial(p, tc, teacher)
                if tc.schedule != "one_shot":  # the ratios it ran (pruned further where it came out over)
                    trial.set_user_attr("ratios", tc.ratios)
                sizes = measure_sizes(model, shape, tc, p.seed, onnx=on == "onnx")
                size = sizes[SIZE_KEY[on]]
                excess = budget_excess(size, p.budget)
                constrain(trial, "budget_excess", excess)
                for key, value in sizes.items():
                    trial.set_user_attr(key, value)
                log.metrics({**sizes, **count_params(model)})
                if p.budget_ms:  # latency depends on the shapes alone: measured before any fine-tuning
                    latency = deployed_latency(model, shape, p.calib, batch=p.budget_batch, runtime=p.runtime)
                    key = latency_key(p.budget_batch)
                    trial.set_user_attr(key, latency)
                    log.metrics({key: latency})
                    over = latency - p.budget_ms
                    trial.set_user_attr("latency_excess", over)
                    if hasattr(trial, "set_constraint"):
                        trial.set_constraint("latency_excess", over)
                    if over > 0 and excess <= 0:
                        excess = over  # rejected below, like a model over the size budget
                if excess > 0:  # over the budget: rejected before any fine-tuning
                    constrain(trial, "budget_excess_final", excess)
                    set_state(trial, log, "infeasible")
                    outcome = ([0.0, float(size)] + ([1e9] if p.latency else [])) if p.pareto else [0.0]
                else:
                    def report(epoch: int, val_accuracy: float) -> None:
                        log.metrics({"val_accuracy": val_accuracy}, step=epoch)
                        if not p.pareto:
                            trial.report(val_accuracy, epoch)
                            # a starting point is what the search must beat: it is not cut short
                            if trial.should_prune() and not trial.user_attrs.get(START_ATTR):
                                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

                    tuned = finetune_quantized(model, shape, tc, p.loaders, p.device, p.seed, report, teacher,
                                               speed_calib=p.calib if p.budget_ms else None)
                    val = evaluate(tuned.model, p.loaders[1], p.device)["accuracy"]
                    # weights that QAT moved onto or off zero change the encoded size a little: measure again
                    sizes["size_bytes_compressed"] = float(len(tuned.payload))
                    size = sizes[SIZE_KEY[on]]
                    trial.set_user_attr("size_bytes_compressed", sizes["size_bytes_compressed"])
                    log.metrics({"val_accuracy_final": val, **sizes,
                                 "compression_ratio": p.base_fp32 / sizes["size_bytes_compressed"]})
                    excess = budget_excess(size, p.budget)
                    state = "infeasible" if excess > 0 else "complete"  # over after fine-tuning: infeasible after all
                    constrain(trial, "budget_excess_final", excess)
                    outcome = [val, float(size)] if p.pareto else [val]
                    if p.latency:  # the latency budget measured it already, on the same deployed form
                        latency = (float(trial.user_attrs[LATENCY_KEY]) if p.budget_ms and p.budget_batch == 1
                                   else trial_latency(tuned, shape, p.runtime))
                        trial.set_user_attr("latency_ms_p50_cpu", latency)
                        log.metrics({"latency_ms_p50_cpu": latency})
                        outcome.append(latency)
                    set_state(trial, log, state)
            except optuna.TrialPruned:
                set_state(trial, log, "pruned")
                outcome = ["pruned"]
            except Exception:
                set_state(trial, log, "failed")
                raise
        if outcome == ["pruned"]:
            raise optuna.TrialPruned()
        return tuple(outcome) if p.pareto else outcome[0]

    return objective


STORAGE_NOTE = ("the payload (compressed/model.mcpz) holds k-means codebooks, Huffman-coded where it pays: a storage "
                "and download format; mcp.load, or decode_into, decodes it to float32 weights, and the deployable "
                "ONNX file runs those layers in float32 (its grid layers as INT8 weights)")


@dataclass
class Rebuilt:
    """A trial's configuration rebuilt from the starting model and fine-tuned: the winner
    of a study, before anything is logged or registered."""

    number: int
    config: Any  # mcp.tuner.space.TrialConfig, the ratios the trial used
    tuned: Any  # mcp.tuner.trial.Finetuned: the model (weights on their grids) and its payload
    metrics: dict[str, float]
    runtime: str = "onnxruntime"  # where its deployable runs (chosen when it is logged)

    @property
    def model(self) -> torch.nn.Module:
        return self.tuned.model

    def tags(self) -> dict[str, Any]:
        """What it is, for its registered version: the trial, its per-layer ratios and bits,
        the blocks it removed and the heads each attention module kept."""
        tc = self.config
        return {"trial": self.number, "ratios": json.dumps({k: round(v, 4) for k, v in tc.ratios.items()}),
                "bits": json.dumps(tc.bits), "method": "qat",
                **({"prune_schedule": tc.schedule, "prune_epochs": tc.prune_epochs, "prune_lr": f"{tc.prune_lr:.4g}"}
                   if tc.schedule != "one_shot" else {}),
                **({"codebook_layers": ",".join(tc.codebook_layers), "kmeans_init": tc.kmeans_init,
                    "share_biases": str(tc.share_biases).lower(), "storage": STORAGE_NOTE}
                   if tc.codebook_layers else {}),
                **({"dropped_blocks": ",".join(removed_blocks(self.model))} if tc.drop_blocks else {}),
                **({"attention_heads": json.dumps({n: m.num_heads for n, m in attention_modules(self.model).items()})}
                   if any(tc.heads.values()) else {})}

    @property
    def quantization(self) -> dict[str, Any]:
        """What its recipe says of its quantization: QAT on fixed per-layer grids, k-means
        codebooks in its codebook layers."""
        tc = self.config
        return {"method": "qat", "bits": tc.bits, "act_bits": 0, "symmetric": True, "per_channel": True,
                "observer": "minmax", "coding": "fixed", "reduce_range": False,
                **({"codebook_layers": list(tc.codebook_layers), "kmeans_init": tc.kmeans_init,
                    "share_biases": tc.share_biases, "codebook_coding": "huffman"} if tc.codebook_layers else {})}

    def deploy(self, problem: "SearchProblem", folder: str | Path, timing_s: float = 0.3) -> tuple[Path, str]:
        """Write its deployable ONNX file into ``folder`` (INT8 weights behind
        DequantizeLinear; under a latency budget, float32 with INT8 where the problem's
        runtime runs it faster) and add to :attr:`metrics` its size, its ONNX Runtime test
        accuracy and, under a throughput budget, the latency of one call at that batch; set
        :attr:`runtime`. On ``auto`` the file of each available runtime is timed in it side
        by side (``timing_s`` each; ``latency_ms_p50_cpu_<runtime>``), the fastest kept.
        Returns (file, format)."""
        shape = tuple(problem.input_shape)
        self.runtime = problem.runtime
        if self.runtime == "auto":
            names = runtimes.available()
            if self.tuned.calib is None:  # the grid deployable: one file for every runtime
                built = dict.fromkeys(names, self.tuned.onnx(shape, folder))
            else:
                built = {name: self.tuned.onnx(shape, Path(folder) / name, runtime=name) for name in names}
            self.runtime, times = runtimes.fastest_of({n: p for n, (p, _) in built.items()}, shape, timing_s)
            self.metrics.update(runtimes.latency_metrics(times))
            path, fmt = built[self.runtime]
        else:
            path, fmt = self.tuned.onnx(shape, folder, runtime=self.runtime)
        self.metrics["size_bytes_onnx"] = float(path.stat().st_size)
        self.metrics["onnx_test_accuracy"] = ort_evaluate(ort_session(path), problem.loaders[2])["accuracy"]
        if problem.budget_ms and problem.budget_batch > 1:  # a throughput budget's own figure
            self.metrics[BATCH_LATENCY_KEY] = onnx_latency(path, shape, seconds=1.0, batch=problem.budget_batch,
                                                           runtime=self.runtime)
        return path, fmt


def rebuild(problem: SearchProblem, row: dict[str, Any], epochs: int = 0, prune_epochs: int = 0) -> Rebuilt:
    """Prune the starting model as trial ``row`` (of :func:`trial_table`) did, with the
    ratios it used (while it trains for ``prune_epochs``, 0: the trial's own, where the
    trial pruned gradually), fine-tune it for ``epochs`` (0: the trial's own) with QAT at
    its bits, and measure it on the validation and test splits."""
    import optuna

    p = problem
    tc = sample(optuna.trial.FixedTrial(row["params"]), p.space)
    if row.get("ratios"):  # the ratios the trial used (its samples moved to fill the budget)
        tc = dataclasses.replace(tc, ratios=dict(row["ratios"]))
    teacher = teacher_of(p)  # as its trial was
    model, tc = prune_trial(p, tc, teacher, prune_epochs)
    tuned = finetune_quantized(model, p.input_shape, tc, p.loaders, p.device, p.seed, batch_loss=teacher,
                               epochs=epochs or tc.epochs, speed_calib=p.calib if p.budget_ms else None)
    test = evaluate(tuned.model, p.loaders[2], p.device)
    val = evaluate(tuned.model, p.loaders[1], p.device)
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "val_accuracy": val["accuracy"],
               "val_loss": val["loss"], "size_bytes_compressed": float(len(tuned.payload)),
               **model_metrics(tuned.model, p.input_shape, p.device)}
    tuned.model.eval()
    return Rebuilt(row["number"], tc, tuned, metrics)


WINNER_KEYS = ("test_accuracy", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx", "onnx_test_accuracy",
               "compression_ratio", "sparsity")


def winner_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """What a winner's record carries of its measurements (its deployed latencies where measured)."""
    return {**{k: metrics[k] for k in WINNER_KEYS},
            **{k: metrics[k] for k in (LATENCY_KEY, BATCH_LATENCY_KEY, "val_loss") if k in metrics}}


def best_trials(rows: list[dict[str, Any]], count: int = 1, budget_ms: float = 0.0,
                budget_batch: int = 1) -> list[dict[str, Any]]:
    """The ``count`` best feasible complete trials by validation accuracy; ties go to the
    faster under a latency budget (what the user asked for), else to the smaller. With
    two or more, the best starting trial of each kind (Deep Compression's allocation,
    then the uniform recipes) takes a place when none of its kind is among the best: a
    few epochs rank trials within the validation split's noise (on MNIST's 1,200
    validation images the best five trials of a study lay within a third of a point), and the
    starts are the recipes a full rebuild is known to do well on."""
    done = sorted((t for t in rows if t["state"] == "complete" and t["feasible"]),
                  key=lambda t: (-t["val_accuracy"], tie_break(t, budget_ms, budget_batch)))
    if count < 2:
        return done[:count]
    picked = done[:1]
    for kind in START_KINDS:
        best = next((t for t in done if t.get("start") == kind), None)
        if best is not None and len(picked) < count and not any(t.get("start") == kind for t in picked):
            picked.append(best)
    picked += [t for t in done if t not in picked][:count - len(picked)]
    return sorted(picked, key=done.index)


def finalist_rank(winner: Mapping[str, Any], budget_ms: float = 0.0, budget_batch: int = 1) -> tuple:
    """The order of rebuilt finalists: the most accurate on the validation split; among
    equally accurate ones (1,200 images tie often: one image is 0.08 points), under a
    latency budget the faster, then the lower validation loss, then the smaller. A winner
    recorded before the loss was (no ``val_loss``) ranks after those with one."""
    loss, (size, _) = winner.get("val_loss", float("inf")), tie_break(winner)
    if budget_ms:
        return -winner["val_accuracy"], tie_break(winner, budget_ms, budget_batch)[0], loss, size
    return -winner["val_accuracy"], loss, size


def tie_break(row: Mapping[str, Any], budget_ms: float = 0.0, budget_batch: int = 1) -> tuple[float, float]:
    """Among trials equally accurate on the validation split: under a latency budget the
    faster, else the smaller (rebuilt finalists: :func:`finalist_rank`)."""
    size = row.get("size_bytes", row.get("size_bytes_compressed")) or 0.0
    if budget_ms:
        latency = row.get(latency_key(budget_batch))
        return (latency if latency is not None else float("inf"), size)
    return (size, 0.0)


class SearchWarning(UserWarning):
    """Something the search could not do as asked, said once (a uniform start it could not seed)."""


@dataclass
class UniformStart:
    """What :func:`enqueue_uniform` seeded a new study with, and what it could not."""

    queued: list[str] = field(default_factory=list)  # what each enqueued trial is: its ratio and bits
    kind: str = ""  # "uniform", or "uniform where allowed" (clipped to each layer's range)
    warning: str = ""  # why no strictly uniform trial was enqueued ('' when one was, or none was meant)

    def describe(self) -> str:
        return f"{self.kind}: {'; '.join(self.queued)}" if self.queued else ""


def _start_params(space, ratios: dict[str, float], bits: dict[str, int], sparsity: float,
                  drop: int | None = None) -> dict[str, Any]:
    """The Optuna params of a configuration given per unit (a unit whose range is one value
    or whose bit-width has one choice is not sampled, so it has no param) that removes
    ``sparsity`` of the weights overall (it picks the schedule: :func:`start_schedule`)."""
    params: dict[str, Any] = {}
    schedule = start_schedule(space, sparsity)
    for unit in space.units:
        lo, hi = space.ratio_of[unit]
        if hi > lo:
            params[f"ratio.{unit}"] = ratios[unit]
        if len(space.bits_of[unit]) > 1:
            params[f"bits.{unit}"] = bits[unit]
        if len(space.encodings_of(unit)) > 1:  # a uniform start takes each unit's first encoding
            params[f"encoding.{unit}"] = space.encodings_of(unit)[0]
    if len(space.kmeans_init) > 1 and any(space.encodings_of(u)[0] == "codebook" for u in space.units):
        params["kmeans_init"] = space.kmeans_init[0]
    if len(space.share_biases) > 1 and any(space.encodings_of(u)[0] == "codebook" for u in space.units):
        params["share_biases"] = space.share_biases[0]
    if len(space.schedule) > 1:  # a start that prunes gradually does so over the space's most epochs
        params["schedule"] = schedule
    if schedule != "one_shot" and space.prune_epochs[1] > space.prune_epochs[0]:
        params["prune_epochs"] = space.prune_epochs[1]
    if schedule != "one_shot" and space.prune_lr[1] > space.prune_lr[0]:
        params["prune_lr"] = (space.prune_lr[0] * space.prune_lr[1]) ** 0.5
    if len(space.granularity) > 1:  # the granularity and criterion the sizes were measured at
        params["granularity"] = space.granularity[0]
    if len(space.criterion) > 1:
        params["criterion"] = space.criterion[0]
    if len(space.round_to) > 1:
        params["round_to"] = space.round_to[0]
    if space.drop_blocks[1] > space.drop_blocks[0]:  # by default, a uniform start keeps every block it may
        params["drop_blocks"] = space.drop_blocks[0] if drop is None else drop
    if space.heads[1] > space.heads[0]:  # and every head it may
        params.update({f"heads.{name}": head_span(space, name)[0] for name in space.attention
                       if head_span(space, name)[1] > head_span(space, name)[0]})
    if space.epochs[1] > space.epochs[0]:
        params["epochs"] = space.epochs[1]
    if space.lr[1] > space.lr[0]:
        params["lr"] = (space.lr[0] * space.lr[1]) ** 0.5
    return params


def _span(space, unit: str) -> str:
    lo, hi = space.ratio_of[unit]
    return f"[{lo:g}, {hi:g}]"


def start_note(start: UniformStart, trials: int, sampler: str) -> str:
    """'20 trials: the first 2 are uniform starting points (...), 18 sampled by tpe'."""
    queued = len(start.queued)
    return (f"{trials} trial{'s' if trials != 1 else ''}: the first {queued} {'are' if queued > 1 else 'is'} uniform "
            f"starting point{'s' if queued > 1 else ''} ({start.describe()}), {max(0, trials - queued)} sampled by "
            f"{sampler}" + (" (raise --trials for a search beyond the uniform starts)" if queued >= trials / 2 else ""))


def enqueue_uniform(study, problem: SearchProblem, max_accuracy: bool, limit: int | None = None) -> UniformStart:
    """Start a new study from the uniform configurations that fill the budget (one ratio in
    every layer, for each bit-width that every layer allows; the longest fine-tuning): the
    search begins with every uniform recipe the space holds (the fewest bits first, at most
    ``limit``: no more than the trials the call runs), and must beat the best of them (on the
    validation split) to change the winner. A space whose ``starts`` name ``global`` also
    starts, per bit-width, from Deep Compression's allocation (:func:`_global_starts`).

    When the space rules that out (a layer's ratio range caps it below the ratio the budget
    needs, no single ratio lies in every range, or no bit-width is allowed everywhere),
    ``warning`` says which layer excludes what, and the study starts instead from "uniform
    where allowed": every layer at one ratio and one bit-width, each clipped to what that
    layer allows, at the least pruning that fits. Nothing is seeded without a budget or for
    a Pareto front (there is no single recipe to beat)."""
    space, p = problem.space, problem
    start = UniformStart()
    if p.budget is None and p.budget_ms and max_accuracy:
        return _uniform_within_latency(study, p, limit)
    if p.budget is None or not max_accuracy:
        return start
    budget = p.budget * (1 - FILL_SLACK)
    epochs, lr = space.epochs[1], space.lr[0]
    units = list(space.units)

    def smallest_fitting(config, lo: float, hi: float, steps: int = 12) -> float | None:
        return ratio_at_budget(p.base, p.input_shape, config, lo, hi, budget, p.calib, p.device, p.seed, steps,
                               p.budget_on)

    lows = {u: space.ratio_of[u][0] for u in units}
    highs = {u: space.ratio_of[u][1] for u in units}
    lo_unit, hi_unit = max(units, key=lows.get), min(units, key=highs.get)
    lo, hi, top = lows[lo_unit], highs[hi_unit], max(highs.values())
    all_bits = sorted({b for choices in space.bits_of.values() for b in choices})
    everywhere = [b for b in all_bits if all(b in space.bits_of[u] for u in units)]
    reasons: list[str] = []
    narrower = [b for b in all_bits if b not in everywhere and (not everywhere or b < everywhere[0])]
    if narrower:  # the fewest bits, which a uniform start would take, are not allowed everywhere
        excluding: dict[str, list[int]] = {}
        for b in narrower:
            excluding.setdefault(next(u for u in units if b not in space.bits_of[u]), []).append(b)
        reasons.append("; ".join(f"{u} allows only {', '.join(map(str, space.bits_of[u]))} bits, not "
                                 f"{', '.join(map(str, bs))}" for u, bs in excluding.items())
                       + ("" if everywhere else ": no bit-width is allowed in every layer"))
    if lo > hi:
        reasons.append(f"no single ratio lies in every layer's range ({lo_unit} allows {_span(space, lo_unit)}, "
                       f"{hi_unit} allows {_span(space, hi_unit)})")
    for bits in everywhere if lo <= hi else ():
        if limit is not None and len(start.queued) >= limit:
            break
        ratio = smallest_fitting(lambda r, b=bits: uniform(space, r, b, epochs, lr), lo, hi)
        if ratio is not None:
            study.enqueue_trial(_start_params(space, {u: ratio for u in units}, {u: bits for u in units}, ratio),
                                user_attrs={START_ATTR: "uniform"}, skip_if_exists=True)
            start.kind = "uniform"
            start.queued.append(f"ratio {ratio:.4f} and {bits} bits in every layer")
            continue
        needed = (smallest_fitting(lambda r, b=bits: uniform(space, r, b, epochs, lr), hi, top, steps=7)
                  if top > hi else None)  # to name it: two decimals are enough
        if needed is not None:
            reasons.append(f"{hi_unit}'s ratio range {_span(space, hi_unit)} excludes {needed:.2f}, the ratio at "
                           f"which {bits} bits in every layer fits the budget")
        else:
            reasons.append(f"no ratio up to {top:g} fits the budget with {bits} bits in every layer")
    if start.queued:
        if "global" in space.starts:
            _global_starts(study, p, budget, everywhere, limit, start)
        return start

    for bits in all_bits:  # the closest the space allows: one ratio and bit-width, clipped per layer
        if len(start.queued) == min(2, limit or 2):
            break
        ratio = smallest_fitting(lambda r, b=bits: uniform_where_allowed(space, r, b, epochs, lr),
                                 min(lows.values()), top)
        if ratio is None:
            continue
        ratios = {u: clipped_ratio(space, u, ratio) for u in units}
        widths = {u: allowed_bits(space.bits_of[u], bits) for u in units}
        study.enqueue_trial(_start_params(space, ratios, widths, ratio), user_attrs={START_ATTR: "uniform"},
                            skip_if_exists=True)
        start.kind = "uniform where allowed"
        clipped = [f"{u} at {ratios[u]:g}" + (f", {widths[u]} bits" if widths[u] != bits else "")
                   for u in units if (ratios[u], widths[u]) != (ratio, bits)]
        start.queued.append(f"ratio {ratio:.4f} and {bits} bits ({'; '.join(clipped)})")
    instead = (f"; starting instead from uniform where allowed (one ratio and bit-width, each layer's clipped to "
               f"what it allows): {'; '.join(start.queued)}" if start.queued else
               "; no configuration clipped to what each layer allows fits the budget either")
    start.warning = ("no uniform starting trial (one prune ratio and one bit-width in every layer) to compare the "
                     "search with: " + "; ".join(reasons) + instead)
    return start


def global_allocation(base: torch.nn.Module, space, sparsity: float) -> dict[str, float]:
    """Per unit of ``space``: the share of its weights that one magnitude threshold over
    all the space's layers removes when it removes ``sparsity`` of them all (Deep
    Compression's allocation: big layers lose more, a small classifier less), clipped to
    the unit's ratio range."""
    modules = dict(base.named_modules())
    weights = {u: torch.cat([modules[n].weight.detach().abs().flatten().cpu() for n in members])
               for u, members in space.units.items()}
    every = torch.cat(list(weights.values()))
    k = int(sparsity * every.numel())
    if k == 0:
        return {u: clipped_ratio(space, u, 0.0) for u in weights}
    threshold = every.kthvalue(k).values
    return {u: clipped_ratio(space, u, float((w <= threshold).float().mean())) for u, w in weights.items()}


def _global_starts(study, p: SearchProblem, budget: float, widths: list[int], limit: int | None,
                   start: UniformStart) -> None:
    """Queue, after the uniform starts, one start per bit-width with Deep Compression's
    allocation (:func:`global_allocation`) at the least overall sparsity that fits the
    budget (space key ``starts``), at most ``limit`` starts in all."""
    space = p.space
    epochs, lr = space.epochs[1], space.lr[0]

    def config(sparsity: float, bits: int):
        shares = global_allocation(p.base, space, sparsity)
        tc = uniform(space, 0.0, bits, epochs, lr)
        return dataclasses.replace(tc, ratios={n: shares[u] for u, members in space.units.items() for n in members})

    for bits in widths:
        if limit is not None and len(start.queued) >= limit:
            break
        sparsity = ratio_at_budget(p.base, p.input_shape, lambda s, b=bits: config(s, b), 0.0,
                                   max(hi for _, hi in space.ratio_of.values()), budget, p.calib, p.device, p.seed,
                                   12, p.budget_on)
        if sparsity is None:
            continue
        shares = global_allocation(p.base, space, sparsity)
        study.enqueue_trial(_start_params(space, shares, {u: bits for u in space.units}, sparsity),
                            user_attrs={START_ATTR: "global"}, skip_if_exists=True)
        start.queued.append(f"global magnitude {sparsity:.4f} ({', '.join(f'{u} {r:.4f}' for u, r in shares.items())}) "
                            f"and {bits} bits")


def _uniform_within_latency(study, p: SearchProblem, limit: int | None = None) -> UniformStart:
    """A latency budget alone: start from the least uniform pruning (one ratio in every
    layer, clipped to what each allows; the widest bit-width) whose deployed model meets
    it, by bisection on measured latency: what uniform pruning by hand would deploy, and
    what the search must beat. A space that removes blocks gets one such start at its
    fewest and one at its most blocks removed (at most ``limit`` starts): how to spend the
    budget between depth and width is the search's first question."""
    space, start = p.space, UniformStart()
    if space.granularity[0] != "structured":  # only removed channels change the latency
        return start
    units = list(space.units)
    bits = max(b for choices in space.bits_of.values() for b in choices)
    lo, hi = min(space.ratio_of[u][0] for u in units), max(space.ratio_of[u][1] for u in units)
    depths = sorted({space.drop_blocks[0], space.drop_blocks[1]})
    for drop in depths[:limit] if limit else depths:
        ratio = ratio_at_budget(p.base, p.input_shape,
                                lambda r, d=drop: uniform_where_allowed(space, r, bits, space.epochs[1], space.lr[0],
                                                                        d), lo, hi,
                                p.budget_ms, p.calib, p.device, p.seed, steps=7,
                                measure=lambda model: deployed_latency(model, p.input_shape, p.calib, runtime=p.runtime,
                                                                       batch=p.budget_batch))
        if ratio is None:
            continue
        ratios = {u: clipped_ratio(space, u, ratio) for u in units}
        widths = {u: allowed_bits(space.bits_of[u], bits) for u in units}
        study.enqueue_trial(_start_params(space, ratios, widths, ratio, drop), user_attrs={START_ATTR: "uniform"},
                            skip_if_exists=True)
        clipped = any(r != ratio for r in ratios.values())
        start.kind = "uniform where allowed" if clipped or start.kind == "uniform where allowed" else "uniform"
        ran = sorted(set(ratios.values()))  # what the trial runs, not the ratio before clipping
        start.queued.append((f"ratio {ran[0]:.4f} in every layer" if len(ran) == 1 else
                             "ratio {:.4f} clipped to each layer's range: {}".format(
                                 ratio, "; ".join(f"{u} at {r:g}" for u, r in ratios.items())))
                            + ("" if not clipped or len(ran) > 1 else
                               f" (the space's least; {ratio:.4f} already met the budget)" if ran[0] > ratio else
                               f" (the space's largest; the budget needs {ratio:.4f})")
                            + (f" with {drop} blocks removed" if drop else "")
                            + f", the least uniform pruning within {p.budget_ms:g} ms")
    if not start.queued:
        start.warning = (f"no uniform starting trial: one ratio in every layer meets the latency budget of "
                         f"{p.budget_ms:g} ms only beyond the space's ranges")
    return start


TRIAL_COLUMNS = ("number", "state", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx", "latency_ms_p50_cpu",
                 "batch_latency_ms_p50_cpu", "feasible", "params", "ratios", "mlflow_run_id", "start")


def write_trials_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The study's trials (rows of :func:`trial_table`) as a CSV file."""
    import csv
    import json

    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TRIAL_COLUMNS)
        for t in rows:
            writer.writerow([json.dumps(t[k] or {}) if k in ("params", "ratios") else
                             ("" if t[k] is None else t[k]) for k in TRIAL_COLUMNS])
    return Path(path)


def trial_table(study, budget_on: str) -> list[dict[str, Any]]:
    """One row per trial: state, validation accuracy, sizes, latency, feasibility, params."""
    rows = []
    for t in study.trials:
        state = t.user_attrs.get("state") or t.state.name.lower()
        if t.state.name == "FAIL":
            state = "failed"
        values = t.values or []
        rows.append({"number": t.number, "state": state, "val_accuracy": values[0] if values else None,
                     "size_bytes_compressed": t.user_attrs.get("size_bytes_compressed"),
                     "size_bytes_onnx": t.user_attrs.get("size_bytes_onnx"),
                     "size_bytes": t.user_attrs.get(SIZE_KEY[budget_on]),
                     "latency_ms_p50_cpu": t.user_attrs.get(LATENCY_KEY),
                     "batch_latency_ms_p50_cpu": t.user_attrs.get(BATCH_LATENCY_KEY),
                     "feasible": t.user_attrs.get("budget_excess", 1.0) <= 0
                     and t.user_attrs.get("latency_excess", 0.0) <= 0, "params": dict(t.params),
                     "ratios": t.user_attrs.get("ratios"), "start": t.user_attrs.get(START_ATTR, ""),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id")})
    return rows
