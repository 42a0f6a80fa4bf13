"""The charts of a comparison: scores with their intervals, confusion, calibration, ROC, training curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from featurepipe import plots, stats
from featurepipe.evaluate import Predictions
from featurepipe.files import read_json
from featurepipe.runs import RunPaths

# Every chart of one run's comparison, saved as <name>.png in the report folder.
RUN_FIGURES = ("accuracy", "macro_f1", "confusion", "reliability", "roc", "training_curves", "top_losses", "gradcam")


def run_figures(paths: RunPaths, preds: dict[str, Predictions], summary: dict[str, Any],
                out: Path) -> dict[str, Path]:
    models = summary["models"]
    n, arch = summary["test_size"], summary["run"]["arch"]
    figures = {}
    for metric, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        figures[metric] = out / f"{metric}.png"
        plots.metric_bars({k: m[metric] for k, m in models.items()}, figures[metric], metric,
                          f"Test {label}, {n} images ({arch} features), 95% bootstrap CI",
                          ci={k: m[f"{metric}_ci"] for k, m in models.items()},
                          baseline=(f"majority class ({summary['baseline']['class']})", summary["baseline"][metric]))
    figures["confusion"] = out / "confusion.png"
    plots.confusion_matrices(
        {k: confusion_matrix(p.y_true, p.y_pred, labels=np.arange(len(p.class_names))) for k, p in preds.items()},
        summary["class_names"], figures["confusion"])
    figures["reliability"] = out / "reliability.png"
    plots.reliability_diagrams({k: stats.reliability(p.y_true, p.proba) for k, p in preds.items()},
                               len(summary["class_names"]), figures["reliability"])
    if all(models[k]["roc_auc"] is not None for k in preds):
        figures["roc"] = out / "roc.png"
        binary = len(summary["class_names"]) == 2
        plots.roc_curves({k: (*_roc(p), models[k]["roc_auc"]) for k, p in preds.items()}, figures["roc"],
                         f"ROC, positive class '{summary['class_names'][1]}'" if binary
                         else "ROC, macro average of one-vs-rest curves")
    if paths.history.exists():
        figures["training_curves"] = out / "training_curves.png"
        best = read_json(paths.cnn_metrics).get("best_epoch") if paths.cnn_metrics.exists() else None
        plots.training_curves(read_history(paths.history), figures["training_curves"], best_epoch=best)
    return figures


def _roc(p: Predictions) -> tuple[np.ndarray, np.ndarray]:
    if p.proba.shape[1] == 2:
        fpr, tpr, _ = roc_curve(p.y_true, p.proba[:, 1])
        return fpr, tpr
    grid = np.linspace(0, 1, 201)
    tprs = []
    for k in range(p.proba.shape[1]):
        fpr, tpr, _ = roc_curve(p.y_true == k, p.proba[:, k])
        tprs.append(np.interp(grid, fpr, tpr))
    return grid, np.mean(tprs, axis=0)


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def runs_figures(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Accuracy and macro F1 of every model of every run, side by side."""
    figures = {}
    for metric, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        figures[metric] = out / f"{metric}.png"
        plots.grouped_bars({r: {m: v[metric] for m, v in res["models"].items()} for r, res in results.items()},
                           {r: {m: v[f"{metric}_ci"] for m, v in res["models"].items()} for r, res in results.items()},
                           figures[metric], metric, f"Test {label} per run and model, 95% bootstrap CI")
    return figures
