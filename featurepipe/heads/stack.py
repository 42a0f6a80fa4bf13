"""`stack`: a logistic regression on the log-probabilities of the CNN and every other head, fitted on
the val split (its C by stratified CV on val), scored on test."""

from __future__ import annotations

import time

import numpy as np
from sklearn.pipeline import Pipeline

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, load_predictions
from featurepipe.features import FeatureSplit
from featurepipe.files import require
from featurepipe.heads.files import write_head
from featurepipe.heads.fitting import SkipHead, choose, full_proba, stratified_folds
from featurepipe.heads.registry import STACK, STACK_SPEC, HeadSpec
from featurepipe.run_config import RunConfig
from featurepipe.runs import RunPaths

STACK_CV_FOLDS = 5


def stack_inputs(cfg: RunConfig) -> list[str]:
    """The CNN and every head already fitted on the current checkpoint's features whose val predictions are
    held out (stack learns from them), stack excluded."""
    names = [h for h in cfg.fitted_heads() if h != STACK and cfg.val_held_out(h)]
    for h in names:
        cfg.head_info(h)
    return ["cnn", *names]


def fit_stack(cfg: RunConfig, val: FeatureSplit, test: FeatureSplit, tune: str, jobs: int) -> dict[str, float]:
    """Fit the stacker on the val predictions of the CNN and the heads; C by stratified CV on val."""
    paths, class_names, seed = cfg.paths, cfg.class_names, cfg.seed
    t0 = time.perf_counter()
    inputs = stack_inputs(cfg)
    if len(inputs) < 2 and cfg.train.folds > 1:
        raise SkipHead("on a --folds run only the CNN's val predictions (and the frozen arm's) are of images their "
                       "models did not learn from; nothing held out to combine the CNN with")
    if len(inputs) < 2:
        raise FeaturepipeError(f"--heads stack: no fitted heads to combine with the CNN in {paths.heads}; "
                               "fit some first, e.g. --heads svm,logreg,stack")
    require(paths.predictions("cnn", "val"), "CNN val predictions",
            f"re-run featurepipe train-cnn --out {paths.root} --overwrite (older runs did not keep them)")
    P_val = _stacked(paths, inputs, "val", val.ids, class_names)
    P_test = _stacked(paths, inputs, "test", test.ids, class_names)
    y = np.asarray(val.labels)
    if np.bincount(y)[np.unique(y)].min() < 2:
        raise SkipHead("a class has fewer than 2 val images; the stack's own val figures come from "
                       "cross-validation on val")
    spec = STACK_SPEC
    if tune == "none":
        params, table = dict(spec.defaults), []
    else:
        params, table, _ = choose(spec, P_val, y, None, None, "cv", seed, jobs, STACK_CV_FOLDS)
    model = spec.build(seed, jobs).set_params(**params).fit(P_val, y)
    # The stack is fitted on val, so its val figures come from the folds it did not see.
    oof = _out_of_fold_proba(spec, params, P_val, y, len(class_names), seed)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    proba = full_proba(model, P_test, len(class_names))
    predict_seconds = time.perf_counter() - t0
    info = {
        "head": STACK, "inputs": inputs, "tuned_on": "cv on val" if table else "none", "params": params,
        "candidates": table, "grid": spec.grid if table else {}, "fitted_on": "val", "checkpoint": cfg.checkpoint,
        "seed": seed, "class_names": class_names, "n_train": len(y),
        "coefficients": _coefficients(model, inputs, class_names),
    }
    val_pred = Predictions(val.ids, y, oof, class_names)
    test_pred = Predictions(test.ids, test.labels, proba, class_names)
    return write_head(paths, STACK, model, info, fit_seconds, predict_seconds, val_pred, test_pred)


def _stacked(paths: RunPaths, inputs: list[str], split: str, ids: list[str], class_names: list[str]) -> np.ndarray:
    cols = []
    for name in inputs:
        p = load_predictions(paths.predictions(name, split), class_names)
        if p.ids != ids:
            raise FeaturepipeError(f"{paths.predictions(name, split)}: covers other {split} images than "
                                   f"{paths.features}; re-run fit-heads --heads {name}")
        cols.append(p.proba)
    return np.hstack(cols)


def _out_of_fold_proba(spec: HeadSpec, params, X, y, n_classes: int, seed: int) -> np.ndarray:
    out = np.zeros((len(y), n_classes))
    for tr, te in stratified_folds(y, STACK_CV_FOLDS, seed):
        model = spec.build(seed, 1).set_params(**params).fit(X[tr], y[tr])
        out[te] = full_proba(model, X[te], n_classes)
    return out


def _coefficients(model: Pipeline, inputs: list[str], class_names: list[str]) -> dict[str, list[float]]:
    """The stacker's weight per input model (rows: classes, or one row for two classes)."""
    coef = model.named_steps["clf"].coef_
    k = len(class_names)
    return {name: coef[:, i * k:(i + 1) * k].round(4).tolist() for i, name in enumerate(inputs)}
