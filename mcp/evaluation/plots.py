"""Plots saved as PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from mcp.evaluation.benchmark import pareto_front

LOSS_PARTS = ("ce_loss", "kd_loss", "hint_loss")  # a distillation loss's terms, when training logged them


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | Path, title: str = "",
                         reference: Mapping[str, float] | None = None) -> Path:
    """Loss (and its distillation terms), accuracy (with ``reference`` levels such as a
    teacher's accuracy as dotted lines) and learning rate per epoch, one panel each."""
    plt = _pyplot()
    epochs = list(history["epoch"])
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.8))
    ax_loss.plot(epochs, history["train_loss"], label="train")
    ax_loss.plot(epochs, history["val_loss"], label="val")
    for part in LOSS_PARTS:
        if part in history:
            ax_loss.plot(epochs, history[part], linestyle="--", label=f"train {part.removesuffix('_loss')}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    if all(v > 0 for key in ("train_loss", "val_loss", *LOSS_PARTS) for v in history.get(key, ())):
        ax_loss.set_yscale("log")  # the first epochs would flatten the rest on a linear axis
    ax_loss.legend()
    ax_acc.plot(epochs, history["train_accuracy"], label="train")
    ax_acc.plot(epochs, history["val_accuracy"], label="val")
    for i, (label, level) in enumerate((reference or {}).items()):
        ax_acc.axhline(level, linestyle=":", color=f"C{i + 2}", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    ax_lr.plot(epochs, history["lr"], color="tab:green")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_pruning_curves(history: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Validation accuracy and losses per epoch, with the sparsity schedule overlaid."""
    plt = _pyplot()
    epochs = list(history["epoch"])
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    parts = tuple(k for k in LOSS_PARTS if k in history)  # distillation as the recovery loss
    for ax, keys, label in ((ax_acc, ("train_accuracy", "val_accuracy"), "accuracy"),
                            (ax_loss, ("train_loss", "val_loss", *parts), "loss")):
        for key in keys:
            ax.plot(epochs, history[key], label=key.removesuffix("_loss").removesuffix("_accuracy"),
                    linestyle="--" if key in parts else "-")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label} during pruning and fine-tuning")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.step(epochs, history["pruned_fraction"], where="post", color="tab:red", alpha=0.6, label="sparsity")
        twin.set_ylabel("sparsity (red)")
        twin.set_ylim(0, 1)
        ax.legend(loc="center right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_bars(values: Mapping[str, float], path: str | Path, ylabel: str, title: str = "") -> Path:
    """One bar per key (per-layer sparsity, per-layer sizes, ...)."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
    ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_comparison(rows: Sequence[Mapping[str, object]], label: str, path: str | Path, title: str = "") -> Path:
    """Accuracy vs size and accuracy vs CPU latency, one point per compared variant."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, x_label in ((axes[0], "size_kib", "size (KiB, non-zero fp32)"),
                               (axes[1], "latency_ms_p50_cpu", "CPU latency p50 (ms)")):
        for row in rows:
            ax.scatter(row[x_key], row["test_accuracy"], s=40)
            ax.annotate(str(row[label]), (row[x_key], row["test_accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set(xlabel=x_label, ylabel="test accuracy")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sensitivity(table: Sequence[Mapping[str, object]], layers: Sequence[str], ratios: Sequence[float],
                     path: str | Path, title: str = "") -> Path:
    """Accuracy drop per layer and ratio: a heatmap and one line per layer."""
    import numpy as np

    plt = _pyplot()
    drop = np.zeros((len(layers), len(ratios)))
    for row in table:
        drop[layers.index(row["layer"]), ratios.index(row["ratio"])] = 100 * float(row["drop"])
    fig, (ax_map, ax_lines) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.3 * len(layers) + 1.5)))
    image = ax_map.imshow(drop, aspect="auto", cmap="magma_r")
    ax_map.set_xticks(range(len(ratios)), [f"{r:.2f}" for r in ratios], fontsize=8)
    ax_map.set_yticks(range(len(layers)), layers, fontsize=7)
    ax_map.set(xlabel="ratio pruned in this layer alone", title="validation accuracy drop (points)")
    fig.colorbar(image, ax=ax_map)
    for i, layer in enumerate(layers):
        ax_lines.plot(ratios, drop[i], marker="o", markersize=3, label=layer)
    ax_lines.set(xlabel="ratio", ylabel="accuracy drop (points)", title="per-layer sensitivity")
    ax_lines.grid(alpha=0.3)
    if len(layers) <= 12:
        ax_lines.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_layer_quant(rows: Sequence[Mapping[str, object]], path: str | Path, title: str = "") -> Path:
    """Per quantized layer: its bit-width, and its float32 vs encoded size."""
    import numpy as np

    plt = _pyplot()
    names = [str(r["layer"]) for r in rows]
    x = np.arange(len(names))
    fig, (ax_bits, ax_size) = plt.subplots(1, 2, figsize=(max(10.0, 0.7 * len(names) + 4), 4))
    ax_bits.bar(x, [float(r["bits"]) for r in rows], color="tab:blue")
    ax_bits.set_ylabel("weight bits")
    ax_bits.set_ylim(0, 8.5)
    ax_size.bar(x - 0.2, [float(r["bytes_fp32"]) / 1024 for r in rows], 0.4, label="float32")
    ax_size.bar(x + 0.2, [float(r["bytes_compressed"]) / 1024 for r in rows], 0.4, label="encoded")
    ax_size.set_ylabel("KiB")
    ax_size.set_yscale("log")
    ax_size.legend()
    for ax in (ax_bits, ax_size):
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_tradeoffs(rows: Sequence[Mapping[str, object]], path: str | Path, title: str = "") -> Path:
    """Accuracy vs ONNX size and accuracy vs CPU latency (p50, batch 1), one point per
    model, each panel's Pareto front (smaller and more accurate) drawn as a line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, x_key, x_label in ((axes[0], "size_kib_onnx", "ONNX file (KiB)"),
                               (axes[1], "latency_ms_p50_cpu", "CPU latency p50, batch 1 (ms)")):
        points = [(float(r[x_key]), float(r["test_accuracy"])) for r in rows]
        front = sorted(pareto_front(points), key=lambda i: points[i][0])
        for i, (x, y) in enumerate(points):
            on = i in front
            ax.scatter(x, y, s=55 if on else 35, color="tab:red" if on else "tab:gray", zorder=3)
            ax.annotate(str(rows[i]["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", alpha=0.6,
                label="Pareto front")
        ax.set(xlabel=x_label, ylabel="test accuracy (ONNX Runtime)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_study(study, folder: str | Path, pareto: bool, size_key: str, latency: bool = False) -> list[Path]:
    """Optuna's own plots of a study (matplotlib), as PNG files in ``folder``: the
    parameters' importances and the optimisation history (or the Pareto front), each where
    the study has enough finished trials for it."""
    import warnings

    import optuna.visualization.matplotlib as vis
    from optuna.exceptions import ExperimentalWarning

    plt = _pyplot()
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
    warnings.filterwarnings("ignore", message="Target and region quantiles select the same set")
    plots = {"param_importances.png": lambda: vis.plot_param_importances(
        study, target=(lambda t: -t.values[0]) if pareto else None, target_name="val_accuracy")}
    if pareto:
        plots["pareto_front.png"] = lambda: vis.plot_pareto_front(
            study, target_names=["val_accuracy", size_key] + (["latency_ms_p50_cpu"] if latency else []))
    else:
        plots["optimization_history.png"] = lambda: vis.plot_optimization_history(study)
    made = []
    for name, draw in plots.items():
        try:
            draw()
            path = Path(folder) / name
            plt.gcf().set_size_inches(8, 5)
            plt.savefig(path, dpi=110, bbox_inches="tight")
            made.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this plot
            pass
        finally:
            plt.close("all")
    return made
