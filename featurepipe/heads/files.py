"""A fitted head's files: what fit-heads writes for each head, and the one safe way featurepipe loads one."""

from __future__ import annotations

from typing import Any

import joblib
import numpy as np
import skops.io as sio

from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.evaluate import Predictions, save_evaluation, save_predictions, scores
from featurepipe.files import atomic_path, file_sha256, require, write_json
from featurepipe.heads.registry import TRUSTED_TYPES
from featurepipe.progress import log
from featurepipe.runs import RunPaths, environment


def load_head(paths: RunPaths, name: str, info: dict[str, Any]):
    """A fitted head, from its .skops file with only TRUSTED_TYPES allowed: never code from the run folder.
    `info` is its json: the file must be the one fit-heads wrote with it (its sha256), and take the
    features and give the classes the json says, so a head copied from another run is refused."""
    path = require(paths.head_safe(name), f"safe copy of head '{name}'",
                   f"re-fit it: featurepipe fit-heads --run {paths.root} --heads {name}")
    refit = f"re-fit it: featurepipe fit-heads --run {paths.root} --heads {name}"
    digest = info.get("skops_sha256")
    if digest is None:
        log(f"warning: {paths.head_info(name)} records no hash of {path.name} (fitted by an older featurepipe); "
            f"it cannot tell whether the file is its own; {refit}")
    elif file_sha256(path) != digest:
        raise FeaturepipeError(f"{path}: not the file fit-heads wrote with {paths.head_info(name).name} (its sha256 "
                               f"differs: replaced or copied from another run); {refit}")
    try:
        head = sio.load(path, trusted=TRUSTED_TYPES)
    except Exception as e:  # untrusted types, a damaged zip, another skops version's format, ...
        raise FeaturepipeError(f"{path}: not a head featurepipe can load safely ({first_line(e)}); {refit}") from None
    # What the json says the head takes (the embedding's width; the stack: k probabilities per input) and
    # gives; a json of an older featurepipe may not say, and then that check is left out.
    k = len(info.get("class_names") or [])
    width = info["features"].get("dim") if "features" in info else k * len(info["inputs"]) if "inputs" in info else None
    n_in, classes = getattr(head, "n_features_in_", None), np.asarray(getattr(head, "classes_", np.arange(0)))
    wrong_width = None not in (width, n_in) and n_in != width
    wrong_classes = k and len(classes) and (classes.dtype.kind not in "iu" or classes.min() < 0 or classes.max() >= k)
    if wrong_width or wrong_classes:
        raise FeaturepipeError(f"{path}: takes {n_in} features and gives classes {classes.tolist()[:8]}, not the "
                               f"{width} features and {k} classes of its json; {refit}")
    return head


def write_head(paths: RunPaths, name: str, model, info: dict[str, Any], fit_seconds: float,
               predict_seconds: float, val: Predictions, test: Predictions) -> dict[str, float]:
    """The files every head leaves, the ones compare and predict read: model, json, predictions, report."""
    with atomic_path(paths.head_safe(name)) as tmp:
        sio.dump(model, tmp)
        digest = file_sha256(tmp)
    with atomic_path(paths.head_model(name)) as tmp:
        joblib.dump(model, tmp)
    save_predictions(paths.predictions(name, "val"), val)
    test_scores = save_evaluation(paths.predictions(name), paths.report(name), test)
    val_scores = scores(val) if len(val.ids) else {}
    write_json(paths.head_info(name), {
        **info, "skops_sha256": digest, "val_macro_f1": val_scores.get("macro_f1"), "val": val_scores, "test": test_scores,
        "fit_seconds": round(fit_seconds, 3), "predict_seconds_per_image": predict_seconds / max(1, len(test.ids)),
        "environment": environment(),
    })
    chosen = info.get("params") or {}
    unheld = "" if info.get("val_held_out", True) else " (val trained the CNN: no check)"
    log(f"{name}: {chosen} → val macro F1 {val_scores.get('macro_f1', float('nan')):.4f}{unheld}, test accuracy "
        f"{test_scores['accuracy']:.4f}, macro F1 {test_scores['macro_f1']:.4f} (fit {fit_seconds:.1f} s)")
    return test_scores
