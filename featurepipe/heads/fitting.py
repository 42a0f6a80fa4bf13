"""Choosing a head's hyperparameters and fitting it, features in memory; probabilities over every class."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
from joblib import Parallel, delayed, parallel_config
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import macro_f1
from featurepipe.heads.registry import HeadSpec
from featurepipe.progress import log

TUNE = ("none", "val", "cv")
CV_FOLDS = 3


class SkipHead(Exception):
    """A head that cannot be fitted on these training vectors; fit-heads says why and goes on."""


@contextlib.contextmanager
def one_thread_per_job():
    """Parallel work runs as joblib threads (`--jobs`), with every native pool (BLAS, OpenMP) held to one
    thread inside. On a busy 2-core machine OpenBLAS's own threads made a 0.2 s logistic regression take
    6 s and OpenMP doubled a boosting fit, and worker processes took seconds to start; the estimators'
    heavy loops release the GIL, so threads do run in parallel. Results do not depend on --jobs."""
    with threadpool_limits(limits=1), parallel_config(backend="threading"):
        yield


def _fit_score(base: Pipeline, params: dict[str, Any], X, y, X_eval, y_eval, keep: bool = False):
    model = clone(base).set_params(**params).fit(X, y)
    return macro_f1(y_eval, model.predict(X_eval)), model if keep else None


def choose(spec: HeadSpec, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None, y_val: np.ndarray | None,
           tune: str, seed: int, jobs: int, cv_folds: int = CV_FOLDS
           ) -> tuple[dict[str, Any], list[dict[str, Any]], Pipeline | None]:
    """The chosen params, every candidate's score (macro F1 on val, or its mean over stratified CV folds
    of train) and, tuned on val without calibration, the winner already fitted on train."""
    smallest = int(np.bincount(y)[np.unique(y)].min())
    if tune == "cv" and smallest < 2:
        log("--tune cv: a class has fewer than 2 training vectors; default hyperparameters instead")
        tune = "none"
    # The fewest vectors any fit sees: a CV fold's training part (n minus its largest held-out fold), or all.
    fitted_on = len(y) - math.ceil(len(y) / min(cv_folds, smallest)) if tune == "cv" else len(y)
    candidates = fit_to_data(spec.candidates(tune), fitted_on, smallest, len(np.unique(y)))
    if len(candidates) == 1:
        return candidates[0], [], None
    base = spec.build(seed, 1)  # the parallelism is across candidates, not inside them
    if tune == "val":
        if len(y_val) == 0:
            raise FeaturepipeError("--tune val: the val split is empty; use --tune cv")
        tasks = [(p, X, y, X_val, y_val, not spec.calibrate) for p in candidates]
    else:
        folds = stratified_folds(y, cv_folds, seed)
        tasks = [(p, X[tr], y[tr], X[te], y[te]) for p in candidates for tr, te in folds]
    results = Parallel(n_jobs=jobs)(delayed(_fit_score)(base, *t) for t in tasks)
    per_candidate = np.array([r[0] for r in results]).reshape(len(candidates), -1).mean(axis=1)
    table = [{"params": jsonable(p), "macro_f1": float(s)} for p, s in zip(candidates, per_candidate)]
    best = int(np.argmax(per_candidate))  # ties: the earlier grid point
    return candidates[best], table, results[best][1] if tune == "val" else None


def fit_to_data(candidates: list[dict[str, Any]], n: int, smallest: int, n_classes: int) -> list[dict[str, Any]]:
    """The grid points a small training set can take: k-NN's k at most the `n` vectors it is fitted on,
    and boosting without its inner early-stopping split where that split could not hold every class."""
    out: list[dict[str, Any]] = []
    for params in candidates:
        params = dict(params)
        if "clf__n_neighbors" in params:
            params["clf__n_neighbors"] = min(params["clf__n_neighbors"], n)
        if "clf__max_leaf_nodes" in params and (smallest < 2 or math.ceil(0.1 * n) < n_classes):
            params["clf__early_stopping"] = False
        if params not in out:
            out.append(params)
    return out


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    smallest = int(np.bincount(y)[np.unique(y)].min())
    if smallest < 2:
        raise FeaturepipeError("--tune cv: a class has fewer than 2 training vectors; use --tune val or none")
    cv = StratifiedKFold(n_splits=min(k, smallest), shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y))


def fit_chosen(spec: HeadSpec, params: dict[str, Any], X: np.ndarray, y: np.ndarray, seed: int,
               jobs: int) -> Pipeline:
    model = spec.build(seed, jobs).set_params(**params)
    if spec.calibrate:
        smallest = int(np.bincount(y)[np.unique(y)].min())
        if smallest < 2:
            raise SkipHead("a class has 1 training vector; Platt calibration needs 2 per class")
        clf = CalibratedClassifierCV(model.named_steps["clf"], method="sigmoid", cv=min(CV_FOLDS, smallest),
                                     ensemble=False, n_jobs=jobs)
        model = Pipeline([*model.steps[:-1], ("clf", clf)])
    return model.fit(X, y)


def predict_proba(model: Pipeline, features, n_classes: int, chunk_rows: int) -> np.ndarray:
    """Probabilities over every class of the run, chunk by chunk (features may be an HDF5 dataset)."""
    n = len(features)
    out = np.zeros((n, n_classes))
    for a in range(0, n, chunk_rows):
        out[a:a + chunk_rows] = full_proba(model, features[a:a + chunk_rows], n_classes)
    return out


def full_proba(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba over every class of the run, even one the train split happened not to hold."""
    full = np.zeros((len(X), n_classes))
    if len(X):
        full[:, model.classes_] = model.predict_proba(X)
    return full


def jsonable(params: dict[str, Any]) -> dict[str, Any]:
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)

    return {k: plain(v) for k, v in params.items()}
