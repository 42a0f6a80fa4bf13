"""Metrics, classification reports and the prediction files every model writes in the same format."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics

from featurepipe import stats
from featurepipe.errors import FeaturepipeError
from featurepipe.files import atomic_path, csv_cell, read_cell, write_text


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


def scores(p: Predictions) -> dict[str, float | None]:
    """Every per-model figure of the comparison; None where one is undefined (ROC-AUC without every class)."""
    labels = np.arange(len(p.class_names))
    y, yhat = p.y_true, p.y_pred
    out: dict[str, float | None] = {
        "accuracy": float(metrics.accuracy_score(y, yhat)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y, yhat)),
    }
    prec, rec, _, _ = metrics.precision_recall_fscore_support(y, yhat, labels=labels, average="macro", zero_division=0)
    out |= {"macro_precision": float(prec), "macro_recall": float(rec), "macro_f1": macro_f1(y, yhat, len(labels))}
    prec, rec, f1, _ = metrics.precision_recall_fscore_support(y, yhat, labels=labels, average="weighted",
                                                                zero_division=0)
    out |= {"weighted_precision": float(prec), "weighted_recall": float(rec), "weighted_f1": float(f1)}
    # Rankings (AUC) and thresholds use the saved probabilities as they are; renormalising rows that
    # the 6-digit rounding left at 0.999999 would reorder near-ties. Log loss and ECE need rows summing to 1.
    proba = _normalised(p.proba)
    out |= {
        "roc_auc": stats.roc_auc(y, p.proba),
        "log_loss": float(metrics.log_loss(y, proba, labels=labels)),
        "ece": stats.reliability(y, proba).ece,
        "medmnist_auc": stats.medmnist_auc(y, p.proba),
        "medmnist_acc": stats.medmnist_acc(y, p.proba),
    }
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """The mean of the classes' F1 (0 for a class never predicted, or without images), over the run's
    `n_classes` classes, or without it over the classes y_true and y_pred hold (choosing a head's
    hyperparameters, as it always has)."""
    labels = None if n_classes is None else np.arange(n_classes)
    return float(metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def majority_baseline(train_counts: list[int] | np.ndarray, like: Predictions) -> dict[str, Any]:
    """The majority-class baseline on `like`'s images (always the most frequent training class, with the
    training class frequencies as its probabilities): what a model that learned nothing scores."""
    prior = np.asarray(train_counts, dtype=np.float64)
    base = Predictions(like.ids, like.y_true, np.tile(prior / prior.sum(), (len(like.y_true), 1)), like.class_names)
    return {"name": "majority class", "class": like.class_names[int(prior.argmax())],
            "accuracy": float((base.y_pred == base.y_true).mean()), "macro_f1": scores(base)["macro_f1"]}


def clearly_above(accuracy: float, baseline: float, n: int) -> bool:
    """Above the baseline by more than two binomial standard errors of the baseline's accuracy on n images."""
    return accuracy > baseline + 2 * float(np.sqrt(baseline * (1 - baseline) / max(n, 1)))


def per_class(p: Predictions) -> list[dict[str, float | int | str]]:
    """One row per class: precision, recall, F1, support and the one-vs-rest TP, TN, FP, FN."""
    labels = np.arange(len(p.class_names))
    prec, rec, f1, support = metrics.precision_recall_fscore_support(p.y_true, p.y_pred, labels=labels,
                                                                      zero_division=0)
    mcm = metrics.multilabel_confusion_matrix(p.y_true, p.y_pred, labels=labels)
    return [
        {"class": name, "precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
         "support": int(support[k]), "tp": int(mcm[k, 1, 1]), "tn": int(mcm[k, 0, 0]), "fp": int(mcm[k, 0, 1]),
         "fn": int(mcm[k, 1, 0])}
        for k, name in enumerate(p.class_names)
    ]


def _normalised(proba: np.ndarray) -> np.ndarray:
    # Saved probabilities carry 6 significant digits; rows must sum to 1 again for log loss. A probability
    # of exactly 0 is left for log_loss to clip (at float64's eps), as scikit-learn defines the metric.
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
            w.writerow([csv_cell(id_), csv_cell(p.class_names[t]), csv_cell(p.class_names[k]),
                        *(f"{v:.6g}" for v in row)])


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
        ids=[read_cell(r[0]) for r in body],
        y_true=np.array([index[read_cell(r[1])] for r in body], dtype=np.int64),
        proba=np.array([[float(v) for v in r[3:]] for r in body], dtype=np.float64).reshape(len(body), -1),
        class_names=class_names,
    )


def save_evaluation(pred_path: Path, report_path: Path, p: Predictions) -> dict[str, float | None]:
    """Predictions CSV and classification report for one model; returns its scores."""
    save_predictions(pred_path, p)
    write_text(report_path, report(p))
    return scores(p)
