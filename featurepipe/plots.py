"""Charts (matplotlib, Agg backend, PNG). One colour per model, the same in every chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from featurepipe.runs import atomic_path  # noqa: E402

CNN_COLOR = "#444444"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def model_colors(names: list[str]) -> dict[str, str]:
    heads = [n for n in names if n != "cnn"]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(heads))}
    colors["cnn"] = CNN_COLOR
    return colors


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def metric_bars(values: dict[str, float], path: Path, metric: str = "accuracy", title: str = "") -> None:
    """Bar chart of one test metric per model, each bar labelled with its value."""
    names = list(values)
    colors = model_colors(names)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(names) + 2), 4))
    bars = ax.bar(names, [values[n] for n in names], color=[colors[n] for n in names])
    for bar, name in zip(bars, names):
        ax.annotate(f"{values[name]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", xytext=(0, 3), textcoords="offset points", fontsize=10)
    low = min(values.values())
    ax.set_ylim(max(0.0, low - 0.15) if low > 0.3 else 0.0, 1.0)
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_title(title or f"Test {metric.replace('_', ' ')} per model")
    ax.spines[["top", "right"]].set_visible(False)
    _save(fig, path)


def training_curves(history: list[dict[str, Any]], path: Path) -> None:
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
        ax.set_xlabel("epoch")
        ax.legend()
        ax.spines[["top", "right"]].set_visible(False)
    _save(fig, path)
