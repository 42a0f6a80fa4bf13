"""The comparison's CSV files: every metric per model, and per class."""

from __future__ import annotations

import csv
import io
from typing import Any

from featurepipe.files import csv_cell

PER_CLASS_FIELDS = ("class", "precision", "recall", "f1", "support", "tp", "tn", "fp", "fn")
METRIC_FIELDS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
                 "weighted_precision", "weighted_recall", "weighted_f1", "roc_auc", "log_loss", "ece",
                 "medmnist_auc", "medmnist_acc")


def per_class_csv(tables: dict[str, list[dict[str, Any]]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *PER_CLASS_FIELDS])
    for model, rows in tables.items():
        for r in rows:
            w.writerow([model, *(csv_cell(r[k]) if k == "class" else r[k] for k in PER_CLASS_FIELDS)])
    return buf.getvalue()


def metrics_csv(models: dict[str, dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fields = [*METRIC_FIELDS, "accuracy_ci_low", "accuracy_ci_high", "macro_f1_ci_low", "macro_f1_ci_high",
              "fit_seconds", "predict_seconds_per_image"]
    w.writerow(["model", *fields])
    for name, m in models.items():
        flat = m | {"accuracy_ci_low": m["accuracy_ci"][0], "accuracy_ci_high": m["accuracy_ci"][1],
                    "macro_f1_ci_low": m["macro_f1_ci"][0], "macro_f1_ci_high": m["macro_f1_ci"][1]}
        w.writerow([name, *("" if flat.get(k) is None else flat[k] for k in fields)])
    return buf.getvalue()
