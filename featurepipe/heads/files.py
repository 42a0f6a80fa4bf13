"""A fitted head's files: what fit-heads writes for each head, and the one safe way featurepipe loads one."""

from __future__ import annotations

from typing import Any

import joblib
import skops.io as sio

from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.evaluate import Predictions, save_evaluation, save_predictions, scores
from featurepipe.heads.registry import TRUSTED_TYPES
from featurepipe.progress import log
from featurepipe.runs import RunPaths, atomic_path, environment, require, write_json


def load_head(paths: RunPaths, name: str):
    """A fitted head, from its .skops file with only TRUSTED_TYPES allowed: never code from the run folder."""
    path = require(paths.head_safe(name), f"safe copy of head '{name}'",
                   f"re-fit it: featurepipe fit-heads --run {paths.root} --heads {name}")
    try:
        return sio.load(path, trusted=TRUSTED_TYPES)
    except Exception as e:  # untrusted types, a damaged zip, another skops version's format, ...
        raise FeaturepipeError(f"{path}: not a head featurepipe can load safely ({first_line(e)}); "
                               f"re-fit it: featurepipe fit-heads --run {paths.root} --heads {name}") from None


def write_head(paths: RunPaths, name: str, model, info: dict[str, Any], fit_seconds: float,
               predict_seconds: float, val: Predictions, test: Predictions) -> dict[str, float]:
    """The files every head leaves, the ones compare and predict read: model, json, predictions, report."""
    with atomic_path(paths.head_safe(name)) as tmp:
        sio.dump(model, tmp)
    with atomic_path(paths.head_model(name)) as tmp:
        joblib.dump(model, tmp)
    save_predictions(paths.predictions(name, "val"), val)
    test_scores = save_evaluation(paths.predictions(name), paths.report(name), test)
    val_scores = scores(val) if len(val.ids) else {}
    write_json(paths.head_info(name), {
        **info, "val_macro_f1": val_scores.get("macro_f1"), "val": val_scores, "test": test_scores,
        "fit_seconds": round(fit_seconds, 3), "predict_seconds_per_image": predict_seconds / max(1, len(test.ids)),
        "environment": environment(),
    })
    chosen = info.get("params") or {}
    log(f"{name}: {chosen} → val macro F1 {val_scores.get('macro_f1', float('nan')):.4f}, test accuracy "
        f"{test_scores['accuracy']:.4f}, macro F1 {test_scores['macro_f1']:.4f} (fit {fit_seconds:.1f} s)")
    return test_scores
