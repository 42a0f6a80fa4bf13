"""Metrics, classification reports and the prediction files every model writes in the same format."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import metrics

from featurepipe.errors import FeaturepipeError
from featurepipe.runs import atomic_path, write_text


@dataclass
class Predictions:
    """One model's predictions on one split; `proba` columns follow `class_names`."""

    ids: list[str]
    y_true: np.ndarray
    proba: np.ndarray
    class_names: list[str]

    @property
    def y_pred(self) -> np.ndarray:
        return self.proba.argmax(axis=1)


def scores(p: Predictions) -> dict[str, float]:
    labels = np.arange(len(p.class_names))
    y, yhat = p.y_true, p.y_pred
    return {
        "accuracy": float(metrics.accuracy_score(y, yhat)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y, yhat)),
        "macro_f1": float(metrics.f1_score(y, yhat, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(metrics.f1_score(y, yhat, labels=labels, average="weighted", zero_division=0)),
        "macro_precision": float(metrics.precision_score(y, yhat, labels=labels, average="macro", zero_division=0)),
        "macro_recall": float(metrics.recall_score(y, yhat, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(metrics.log_loss(y, _normalised(p.proba), labels=labels)),
    }


def _normalised(proba: np.ndarray) -> np.ndarray:
    # Saved probabilities carry 6 significant digits; rows must sum to 1 again for log loss.
    proba = np.clip(proba, 1e-15, 1.0)
    return proba / proba.sum(axis=1, keepdims=True)


def report(p: Predictions) -> str:
    return metrics.classification_report(
        p.y_true, p.y_pred, labels=np.arange(len(p.class_names)), target_names=p.class_names,
        digits=4, zero_division=0,
    )


def save_predictions(path: Path, p: Predictions) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "true", "pred", *(f"p_{c}" for c in p.class_names)])
        for id_, t, k, row in zip(p.ids, p.y_true, p.y_pred, p.proba):
            w.writerow([id_, p.class_names[t], p.class_names[k], *(f"{v:.6g}" for v in row)])


def load_predictions(path: Path, class_names: list[str]) -> Predictions:
    index = {c: i for i, c in enumerate(class_names)}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise FeaturepipeError(f"{path}: no predictions; run the command that trains this model first") from None
    header = rows[0]
    if header[3:] != [f"p_{c}" for c in class_names]:
        raise FeaturepipeError(f"{path}: its classes differ from the run's; re-run the command that wrote it")
    body = rows[1:]
    return Predictions(
        ids=[r[0] for r in body],
        y_true=np.array([index[r[1]] for r in body], dtype=np.int64),
        proba=np.array([[float(v) for v in r[3:]] for r in body], dtype=np.float64).reshape(len(body), -1),
        class_names=class_names,
    )


def save_evaluation(pred_path: Path, report_path: Path, p: Predictions) -> dict[str, float]:
    """Predictions CSV and classification report for one model; returns its scores."""
    save_predictions(pred_path, p)
    write_text(report_path, report(p))
    return scores(p)
