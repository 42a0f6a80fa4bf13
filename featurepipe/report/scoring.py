"""The statistics of a comparison: bootstrap intervals for every model, each head's paired tests against
the CNN (McNemar, DeLong, Holm-adjusted), the verdicts, and the majority-class baseline."""

from __future__ import annotations

from typing import Any

import numpy as np

from featurepipe import stats
from featurepipe.evaluate import Predictions, majority_baseline, per_class, scores
from featurepipe.report.inputs import Inputs, model_cost
from featurepipe.run_config import RunConfig

LEVEL = 0.95
ALPHA = 0.05


def best(models: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The model of the highest test accuracy and the one of the highest macro F1. Reports name both
    where they differ: on imbalanced classes they can (dermoscopy4, 2 runs of 10: rf best on accuracy,
    logreg or svm on macro F1), and either alone names a winner the other metric contradicts."""
    return {m: max(models, key=lambda n: models[n][m]) for m in ("accuracy", "macro_f1")}


def best_words(models: dict[str, dict[str, Any]]) -> str:
    top = best(models)
    words = f"{top['accuracy']} ({models[top['accuracy']]['accuracy']:.4f})"
    if top["macro_f1"] != top["accuracy"]:
        words += f"; best on macro F1: {top['macro_f1']} ({models[top['macro_f1']]['macro_f1']:.4f})"
    return words


def score_run(cfg: RunConfig, inputs: Inputs, resamples: int) -> dict[str, Any]:
    """`evaluate_models` with each model's fit and prediction times added to its scores, and the
    majority-class baseline (verdicts against a CNN that is not above it say so)."""
    preds = inputs.preds
    evaluated = evaluate_models(preds, resamples, cfg.seed)
    for name, scores_ in evaluated["models"].items():
        scores_.update(model_cost(name, inputs.records[name]))
    ref = preds["cnn"]
    # Runs written before config.json kept class counts: the test split's own majority class instead.
    train_counts = cfg.data.counts.get("train") or np.bincount(ref.y_true, minlength=len(ref.class_names))
    evaluated["baseline"] = baseline(train_counts, ref, evaluated["models"]["cnn"])
    if not evaluated["baseline"]["cnn_above"]:
        for t in evaluated["tests"].values():
            t["verdict"] = verdict(t, cnn_learned=False)
    return evaluated


def evaluate_models(preds: dict[str, Predictions], resamples: int, seed: int) -> dict[str, Any]:
    """Scores with bootstrap intervals for every model, and every head's paired tests against the CNN.

    All models are scored on the same resamples, so the intervals of a difference are paired too.
    """
    ref = preds["cnn"]
    n_classes = len(ref.class_names)
    idx = stats.stratified_resamples(ref.y_true, resamples, seed)
    models, boot = {}, {}
    for name, p in preds.items():
        boot[name] = {
            "accuracy": stats.accuracy_rows(p.y_true, p.y_pred, idx),
            "macro_f1": stats.macro_f1_rows(p.y_true, p.y_pred, idx, n_classes),
        }
        models[name] = scores(p) | {f"{k}_ci": stats.percentile_interval(v, LEVEL) for k, v in boot[name].items()}

    tests: dict[str, dict[str, Any]] = {}
    cnn_right = ref.y_pred == ref.y_true
    for name, p in preds.items():
        if name == "cnn":
            continue
        t: dict[str, Any] = {}
        for metric in ("accuracy", "macro_f1"):
            t[f"delta_{metric}"] = models[name][metric] - models["cnn"][metric]
            t[f"delta_{metric}_ci"] = stats.percentile_interval(boot[name][metric] - boot["cnn"][metric], LEVEL)
        mc = stats.mcnemar_exact(cnn_right, p.y_pred == p.y_true)
        t["mcnemar"] = {"cnn_only_right": mc.b, "head_only_right": mc.c, "p_value": mc.p_value}
        if n_classes == 2 and np.bincount(ref.y_true, minlength=2).min() >= stats.DELONG_MIN:
            d = stats.delong_test(ref.y_true, ref.proba[:, 1], p.proba[:, 1])
            t["delong"] = {"auc_cnn": d.auc_a, "auc_head": d.auc_b, "difference": d.difference, "z": d.z,
                           "p_value": d.p_value}
        tests[name] = t
    for test in ("mcnemar", "delong"):
        names = [n for n in tests if test in tests[n]]
        for n, adjusted in zip(names, stats.holm([tests[n][test]["p_value"] for n in names]) if names else []):
            tests[n][test]["p_holm"] = adjusted
    for t in tests.values():
        t["decided_by"] = "mcnemar"
        t["verdict"] = verdict(t)
    return {
        "models": models,
        "per_class": {name: per_class(p) for name, p in preds.items()},
        "tests": tests,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "stratified": True,
                      "interval": "percentile"},
    }


def val_to_test(val: dict[str, Predictions], test: dict[str, Predictions],
                records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """For every model with val predictions: does it score lower on test than val predicts (stats.val_to_test),
    less what choosing it on val adds by chance (chosen_on_val), Holm-adjusted over the models. `shifted` names
    those that do: their test images are unlike the val images they were checked on (another site, scanner,
    period), and the heads, fitted to the clean training images' features, can lose more to that than the
    CNN (docs/design.md, "A test set from elsewhere"). `too_small` names those whose val and test could
    show no drop at all: the check has no power there."""
    checks = {}
    for name, v in val.items():
        t = test[name]
        c = stats.val_to_test(v.y_true, v.y_pred, t.y_true, t.y_pred, len(t.class_names),
                              chosen_on_val(name, records.get(name, {})), ALPHA / len(val))  # Holm's first step
        if c is not None:
            checks[name] = {"val_accuracy": float(np.mean(v.y_pred == v.y_true)), "val_size": len(v.ids),
                            "expected": c.expected, "optimism": c.optimism, "observed": c.observed, "z": c.z,
                            "p_value": c.p_value, "can_tell": c.can_tell}
    for name, adjusted in zip(checks, stats.holm([c["p_value"] for c in checks.values()]) if checks else []):
        checks[name]["p_holm"] = adjusted
    return {"models": checks, "shifted": [n for n, c in checks.items() if c["p_holm"] < ALPHA],
            "too_small": [n for n, c in checks.items() if not c["can_tell"]]}


def chosen_on_val(name: str, record: dict[str, Any]) -> int:
    """Among how many candidates a model was chosen by its val score: a head's grid points where it was tuned
    on val; the CNN's epochs where --monitor kept the best (runs older than --monitor always did)."""
    if name == "cnn":
        return int(record.get("epochs_run", 1)) if record.get("monitor") != "none" else 1
    return (len(record.get("candidates") or []) or 1) if record.get("tuned_on") == "val" else 1


# A head's significant win over a CNN that is not above the majority-class baseline: no evidence about heads.
UNTRAINED_WIN = "head better than a CNN that did not learn"


# The tests a verdict can be read from, as the reports name them: McNemar on one test split's paired
# images; on a cross-validation, the fold-level corrected resampled t-test (report/pooled.py says why).
DECIDERS = {"mcnemar": "McNemar", "corrected_t": "corrected t-test"}


def verdict(t: dict[str, Any], cnn_learned: bool = True) -> str:
    """The verdict on accuracy from the Holm-adjusted p of the test `t["decided_by"]` names."""
    if t[t.get("decided_by", "mcnemar")]["p_holm"] >= ALPHA:
        return "no significant difference"
    if t["delta_accuracy"] > 0:
        return "head better" if cnn_learned else UNTRAINED_WIN
    return "CNN better"


def baseline(train_counts: list[int], ref: Predictions, cnn: dict[str, Any]) -> dict[str, Any]:
    """The majority-class baseline on the test images, and whether the CNN is above it: the lower end of
    its accuracy interval above the baseline's accuracy (the baseline is the same on every stratified
    resample, so this is the paired test too)."""
    base = majority_baseline(train_counts, ref)
    return {**base, "cnn_above": bool(cnn["accuracy_ci"][0] > base["accuracy"])}
