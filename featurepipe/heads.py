"""Classical heads on the CNN's embeddings: a registry of scikit-learn Pipelines, fitted on train,
with hyperparameters chosen on val.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import joblib
import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, save_evaluation
from featurepipe.extract import read_attrs, read_split
from featurepipe.models import fingerprint
from featurepipe.progress import log, progress_bar
from featurepipe.runs import atomic_path, environment, load_config, require, run_paths, write_json


@dataclass
class HeadSpec:
    """How to build one head, and the small grid its hyperparameters are chosen from (on val)."""

    build: Callable[[int, int], Pipeline]  # (seed, n_jobs) -> unfitted Pipeline, classifier last as "clf"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    calibrate: bool = False  # wrap the chosen classifier in Platt scaling to get probabilities


HEADS: dict[str, HeadSpec] = {
    "svm": HeadSpec(
        lambda seed, jobs: Pipeline([
            ("scale", StandardScaler()),
            ("clf", SVC(kernel="rbf", class_weight="balanced", random_state=seed)),
        ]),
        {"clf__C": [0.3, 1.0, 3.0, 10.0]},
        calibrate=True,
    ),
    "rf": HeadSpec(
        # Trees need no scaling.
        lambda seed, jobs: Pipeline([
            ("clf", RandomForestClassifier(n_estimators=300, class_weight="balanced_subsample", n_jobs=jobs,
                                           random_state=seed)),
        ]),
        {"clf__min_samples_leaf": [1, 3]},
    ),
    "logreg": HeadSpec(
        lambda seed, jobs: Pipeline([
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(class_weight="balanced", max_iter=3000)),
        ]),
        {"clf__C": [0.01, 0.1, 1.0, 10.0]},
    ),
}
DEFAULT_HEADS = ("svm", "rf", "logreg")


def parse_heads(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in HEADS]
    if unknown or not names:
        raise FeaturepipeError(
            f"--heads {text}: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(HEADS)}"
        )
    return list(dict.fromkeys(names))


def select_and_fit(spec: HeadSpec, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                   seed: int, jobs: int) -> tuple[Pipeline, dict[str, Any], float]:
    """Fit one candidate per grid point on train, keep the one with the best val macro F1."""
    base = spec.build(seed, jobs)
    keys = list(spec.grid)
    best = None
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        params = dict(zip(keys, values))
        model = clone(base).set_params(**params).fit(X, y)
        score = f1_score(y_val, model.predict(X_val), average="macro", zero_division=0)
        if best is None or score > best[2]:
            best = (model, params, float(score))
    model, params, score = best
    if spec.calibrate:
        # Calibrate only the winner: Platt scaling costs a 3-fold refit, too much for every candidate.
        clf = CalibratedClassifierCV(clone(model.named_steps["clf"]), method="sigmoid", cv=3, ensemble=False)
        model = Pipeline([*model.steps[:-1], ("clf", clf)]).fit(X, y)
    return model, params, score


def fit_heads(run: str | Path, names: list[str], jobs: int = -1) -> dict[str, dict[str, float]]:
    paths = run_paths(run)
    cfg = load_config(paths)
    require(paths.features, "features file", f"run featurepipe extract --run {paths.root} first")
    attrs = read_attrs(paths.features)
    current = fingerprint(require(paths.checkpoint, "trained CNN", "run featurepipe train-cnn first"))
    if attrs["checkpoint"] != current:
        raise FeaturepipeError(
            f"{paths.features}: extracted from another checkpoint than {paths.checkpoint}; "
            f"re-run featurepipe extract --run {paths.root}"
        )
    if attrs["class_names"] != cfg["data"]["class_names"]:
        raise FeaturepipeError(f"{paths.features}: its classes differ from the run's; re-run featurepipe extract")
    train, val, test = (read_split(paths.features, s) for s in ("train", "val", "test"))
    seed = cfg["train"]["seed"]
    results = {}
    with progress_bar("head") as bar:
        task = bar.add_task("fit heads", total=len(names), info="")
        for name in names:
            bar.update(task, info=name)
            t0 = time.perf_counter()
            model, params, val_f1 = select_and_fit(HEADS[name], train.features, train.labels, val.features,
                                                   val.labels, seed, jobs)
            fit_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            proba = model.predict_proba(test.features)
            predict_seconds = time.perf_counter() - t0
            with atomic_path(paths.head_model(name)) as tmp:
                joblib.dump(model, tmp)
            pred = Predictions(test.ids, test.labels, _full_proba(proba, model, len(attrs["class_names"])),
                               attrs["class_names"])
            scores = save_evaluation(paths.predictions(name), paths.report(name), pred)
            write_json(paths.head_info(name), {
                "head": name, "params": params, "val_macro_f1": val_f1, "test": scores,
                "fit_seconds": round(fit_seconds, 3), "predict_seconds_per_image": predict_seconds / max(1, len(pred.ids)),
                "checkpoint": current, "seed": seed, "n_train": len(train.labels), "environment": environment(),
            })
            results[name] = scores
            log(f"{name}: {params} val macro F1 {val_f1:.4f} → test accuracy {scores['accuracy']:.4f}, "
                f"macro F1 {scores['macro_f1']:.4f} ({fit_seconds:.1f} s)")
            bar.advance(task)
    return results


def _full_proba(proba: np.ndarray, model: Pipeline, n_classes: int) -> np.ndarray:
    """Probabilities over every class of the run, even one the train split happened not to hold."""
    full = np.zeros((len(proba), n_classes))
    full[:, model.classes_] = proba
    return full
