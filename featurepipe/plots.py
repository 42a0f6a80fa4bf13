"""Charts (matplotlib, Agg backend, PNG). One colour per model, the same in every chart.

Functions take plain numbers and arrays and write one PNG each; `report.py` decides what goes in.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
# Class names, ids and run labels are data: `$...$` in them is text, not mathtext to parse (or fail on).
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from featurepipe.files import atomic_path  # noqa: E402

CNN_COLOR = "#444444"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
WRONG_COLOR = "#c0392b"


def model_colors(names: list[str]) -> dict[str, str]:
    """The CNN is always dark grey; heads take palette colours in name order, so a head keeps its colour
    in every chart of a run and across runs that fitted the same heads."""
    heads = [n for n in names if n != "cnn"]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(heads)))}
    colors["cnn"] = CNN_COLOR
    return colors


# No side of a figure beyond this: sizes grow with classes, models and runs, and a figure sized 0.45 in
# per class took 17.6 GB to draw for 1 000 classes.
MAX_INCHES = 24.0
# Above this many classes a confusion matrix is drawn without class names (they would overlap).
NAMED_CLASSES = 40


def _inches(width: float, height: float) -> tuple[float, float]:
    scale = min(1.0, MAX_INCHES / max(width, height))
    return width * scale, height * scale


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def _tidy(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)


def _floor(values: list[float]) -> float:
    # Start the axis near the lowest bar so small differences stay visible, but never hide a weak model.
    low = min(values)
    return max(0.0, math.floor((low - 0.1) * 10) / 10) if low > 0.3 else 0.0


def _label(metric: str) -> str:
    return metric.replace("_", " ").replace("f1", "F1")


def _unit_axis(ax, low: float, top: float) -> None:
    """A [low, top] axis for scores in [0, 1]: room above 1 for labels, but no tick past 1."""
    ax.set_ylim(low, top)
    ax.set_yticks([t for t in np.linspace(0, 1, 21 if 1 - low <= 0.5 else 11) if t >= low - 1e-9])


def metric_bars(values: dict[str, float], path: Path, metric: str = "accuracy", title: str = "",
                ci: dict[str, list[float]] | None = None, baseline: tuple[str, float] | None = None) -> None:
    """Bar chart of one test metric per model, labelled with its value, with 95% CI error bars if given,
    and a dashed line at (name, score) of a baseline (the majority class: what learning nothing scores)."""
    names = list(values)
    colors = model_colors(names)
    heights = [values[n] for n in names]
    fig, ax = plt.subplots(figsize=_inches(max(4.5, 1.1 * len(names) + 2), 4))
    xs = np.arange(len(names))
    ax.bar(xs, heights, color=[colors[n] for n in names], width=0.65)
    tops = heights
    if ci:
        lo = [values[n] - ci[n][0] for n in names]
        hi = [ci[n][1] - values[n] for n in names]
        ax.errorbar(xs, heights, yerr=[lo, hi], fmt="none", ecolor="black", elinewidth=1.2, capsize=5)
        tops = [ci[n][1] for n in names]
    for x, top, name in zip(xs, tops, names):
        ax.annotate(f"{values[name]:.3f}", (x, top), ha="center", va="bottom", xytext=(0, 3),
                    textcoords="offset points", fontsize=10)
    # "svm (ImageNet, frozen)" is wider than its bar: what the features are goes on lines of their own.
    ticks = [n.replace(" (", "\n(", 1).replace(", ", ",\n") for n in names]
    lines = max(t.count("\n") + 1 for t in ticks)
    ax.set_xticks(xs, ticks, fontsize=10 if lines == 1 else 9)
    lows = [ci[n][0] for n in names] if ci else heights
    if baseline is not None:
        name, score = baseline
        ax.axhline(score, color="#b22222", linestyle="--", linewidth=1.2, label=f"{name}: {score:.3f}", zorder=3)
        # Below the tick labels, where no bar can hide it (bbox_inches="tight" keeps it in the picture).
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.04 - 0.07 * lines), fontsize=8, frameon=False)
        lows = [*lows, score]
    _unit_axis(ax, _floor(lows), 1.06)
    label = _label(metric)
    ax.set_ylabel(f"test {label}")
    ax.set_title(title or f"Test {label} per model" + (" (95% bootstrap CI)" if ci else ""))
    _tidy(ax)
    _save(fig, path)


def grouped_bars(values: dict[str, dict[str, float]], ci: dict[str, dict[str, list[float]]], path: Path,
                 metric: str, title: str) -> None:
    """Several runs side by side: one group of bars per run, one bar per model in its usual colour."""
    groups = list(values)
    models = list(dict.fromkeys(m for g in groups for m in values[g]))
    models = ["cnn", *sorted(m for m in models if m != "cnn")] if "cnn" in models else sorted(models)
    colors = model_colors(models)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=_inches(max(6.0, 0.6 * len(groups) * len(models) + 2.5), 4.4))
    crowded = len(models) > 5  # value labels turn upright when bars get too narrow for them
    lows = []
    for j, model in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i, g in enumerate(groups) if model in values[g]]
        gs = [g for g in groups if model in values[g]]
        v = [values[g][model] for g in gs]
        err = [[values[g][model] - ci[g][model][0] for g in gs], [ci[g][model][1] - values[g][model] for g in gs]]
        lows += [ci[g][model][0] for g in gs]
        ax.bar(xs, v, width=width * 0.92, color=colors[model], label=model)
        ax.errorbar(xs, v, yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
        for x, g in zip(xs, gs):
            ax.annotate(f"{values[g][model]:.3f}", (x, ci[g][model][1]), ha="center", va="bottom",
                        xytext=(0, 2), textcoords="offset points", fontsize=8, rotation=90 if crowded else 0)
    ax.set_xticks(range(len(groups)), groups)
    _unit_axis(ax, _floor(lows), 1.1 if crowded else 1.05)
    ax.set_ylabel(f"test {_label(metric)}")
    ax.set_title(title)
    ax.legend(ncols=min(len(models), 6), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    _tidy(ax)
    _save(fig, path)


def _panels(n: int, size: float = 3.2, max_cols: int = 4):
    # Balanced rows: four models make one row of four, five make rows of three and two.
    rows = math.ceil(n / max_cols)
    cols = math.ceil(n / rows)
    fig, axes = plt.subplots(rows, cols, figsize=_inches(size * cols, size * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def confusion_matrices(matrices: dict[str, np.ndarray], class_names: list[str], path: Path) -> None:
    """One row-normalised confusion matrix per model (each row: where that true class's images went)."""
    colors = model_colors(list(matrices))
    k = len(class_names)
    # Many classes need bigger panels, so fewer per row.
    fig, axes = _panels(len(matrices), size=max(3.2, 0.45 * min(k, NAMED_CLASSES) + 1.6), max_cols=4 if k <= 5 else 2)
    for ax, (name, cm) in zip(axes, matrices.items()):
        rows = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        if k <= 12:
            for (i, j), v in np.ndenumerate(norm):
                if k > 5 and cm[i, j] == 0:
                    continue  # with many classes, zeros are noise: only cells that hold images are labelled
                text = f"{v:.2f}\n({cm[i, j]})" if k <= 5 else f"{v:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=9 if k <= 5 else 7,
                        color="white" if v > 0.55 else "black")
        if k <= NAMED_CLASSES:
            ticks = range(k)
            ax.set_xticks(ticks, class_names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
            ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, color=colors[name], fontweight="bold")
    fig.suptitle("Confusion matrices, normalised per true class (counts in brackets)" if k <= 5
                 else "Confusion matrices, normalised per true class" if k <= NAMED_CLASSES
                 else f"Confusion matrices, normalised per true class; {k} classes, so no names or values: "
                      "classes in the order of per_class.csv")
    fig.tight_layout()
    _save(fig, path)


def reliability_diagrams(bins: dict[str, Any], n_classes: int, path: Path) -> None:
    """Per model: accuracy against mean confidence of the top label in each confidence bin.

    `bins[name]` is a stats.Reliability. Pale red above a bar: its gap to the bin's mean confidence
    (over-confidence). The number over a bar is its image count.
    """
    colors = model_colors(list(bins))
    low = 1.0 / n_classes  # the top label's probability is never below 1/K
    fig, axes = _panels(len(bins), size=3.3)
    for ax, (name, rel) in zip(axes, bins.items()):
        used = rel.count > 0
        left, width = rel.edges[:-1][used], np.diff(rel.edges)[used]
        acc, conf = rel.accuracy[used], rel.confidence[used]
        # The gap sits behind the bar: it shows where confidence exceeds accuracy (over-confidence);
        # a bar reaching above the diagonal is under-confident.
        ax.bar(left, acc, width=width, align="edge", color=colors[name], edgecolor="white", label="accuracy",
               zorder=2)
        ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", color=WRONG_COLOR, alpha=0.3,
               edgecolor="white", label="over-confidence", zorder=1)
        for x, w, top, n in zip(left, width, np.maximum(acc, conf), rel.count[used]):
            ax.annotate(str(n), (x + w / 2, min(top, 1.0)), ha="center", va="bottom", fontsize=6, rotation=90,
                        xytext=(0, 2), textcoords="offset points", color="#555555")
        ax.plot([low, 1], [low, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration",
                zorder=3)
        ax.set_xlim(max(0.0, low - 0.02), 1.0)
        ax.set_ylim(0, 1.15)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_xlabel("confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}  ECE {rel.ece:.3f}", color=colors[name], fontweight="bold")
        _tidy(ax)
    fig.suptitle(f"Reliability diagrams ({len(bins[next(iter(bins))].count)} equal-width bins; "
                 "numbers: images per bin)")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=3, frameon=False)
    _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path, title: str) -> None:
    """One ROC curve per model on one axis; `curves[name]` = (fpr, tpr, auc)."""
    colors = model_colors(list(curves))
    fig, ax = plt.subplots(figsize=(5.2, 5))
    good = all(auc is not None and auc >= 0.9 for _, _, auc in curves.values())
    # Good models crowd into the top-left corner; an inset magnifies it so the curves can be told apart.
    axes = [ax, ax.inset_axes((0.4, 0.38, 0.48, 0.4))] if good else [ax]
    for target in axes:
        for name, (fpr, tpr, auc) in curves.items():
            label = name if auc is None else f"{name} (AUC {auc:.3f})"
            target.plot(fpr, tpr, color=colors[name], linewidth=2 if name == "cnn" else 1.5, label=label)
    if good:
        axes[1].set_xlim(0, 0.25)
        axes[1].set_ylim(0.75, 1.0)
        axes[1].tick_params(labelsize=7)
        axes[1].set_title("top-left corner, magnified", fontsize=8)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=False)
    _tidy(ax)
    _save(fig, path)


def training_curves(history: list[dict[str, Any]], path: Path, best_epoch: int | None = None) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set_title("loss (class-weighted cross-entropy)")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax_acc.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro F1", linestyle="--")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1, label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.legend()
        _tidy(ax)
    _save(fig, path)


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image[..., :3])
    ax.set_xticks([])
    ax.set_yticks([])


def image_gallery(images: list[np.ndarray], captions: list[str], wrong: list[bool], path: Path, title: str,
                  cols: int = 6) -> None:
    """A grid of test images, each captioned (wrong predictions in red)."""
    rows = math.ceil(len(images) / cols)
    lines = max(c.count("\n") + 1 for c in captions)
    fig, axes = plt.subplots(rows, cols, figsize=_inches(2.1 * cols, (2.0 + 0.17 * lines) * rows + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, image, caption, bad in zip(axes.ravel(), images, captions, wrong):
        ax.set_visible(True)
        _show(ax, image)
        ax.set_title(caption, fontsize=8, color=WRONG_COLOR if bad else "black")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def gradcam_grid(images: list[np.ndarray], cams: list[list[np.ndarray]], titles: list[list[str]],
                 path: Path, title: str) -> None:
    """One column per image: the image on top, below it each class-activation map over it
    (`cams[i][j]` in [0, 1], titled `titles[i][j + 1]`); columns may hold fewer maps than others."""
    n_rows = 1 + max(len(c) for c in cams)
    fig, axes = plt.subplots(n_rows, len(images), figsize=_inches(2.3 * len(images), 2.75 * n_rows), squeeze=False)
    for col, (image, maps, names) in enumerate(zip(images, cams, titles)):
        _show(axes[0, col], image)
        axes[0, col].set_title(names[0], fontsize=8)
        for row in range(1, n_rows):
            ax = axes[row, col]
            if row > len(maps):
                ax.set_visible(False)
                continue
            _show(ax, image)
            ax.imshow(maps[row - 1], cmap="jet", alpha=0.45, vmin=0, vmax=1,
                      extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
            ax.set_title(names[row], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
