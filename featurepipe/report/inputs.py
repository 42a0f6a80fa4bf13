"""What a comparison reads from a run, each file once: every model's test predictions and its record,
from which what it cost to fit and run, its chosen hyperparameters and its input are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, load_predictions
from featurepipe.files import read_json, require
from featurepipe.run_config import RunConfig
from featurepipe.runs import train_advice


@dataclass(frozen=True)
class Inputs:
    preds: dict[str, Predictions]  # test predictions, the CNN's first
    records: dict[str, dict[str, Any]]  # cnn/metrics.json for the CNN ({} where absent), heads/<name>.json for a head


def load_all(cfg: RunConfig) -> Inputs:
    """The CNN's and every head's test predictions and records, refused unless all cover the same test images."""
    paths, class_names = cfg.paths, cfg.class_names
    require(paths.predictions("cnn"), "CNN test predictions", train_advice(paths.root, cfg.data.source))
    heads = cfg.fitted_heads()
    if not heads:
        raise FeaturepipeError(f"{paths.heads}: no fitted heads; run featurepipe fit-heads --run {paths.root} first")
    preds = {"cnn": load_predictions(paths.predictions("cnn"), class_names)}
    records = {}
    for name in heads:
        records[name] = cfg.head_info(name)  # refuses a head of an older checkpoint
        preds[name] = load_predictions(paths.predictions(name), class_names)
    reference = preds["cnn"]
    for name, p in preds.items():
        if p.ids != reference.ids or not np.array_equal(p.y_true, reference.y_true):
            raise FeaturepipeError(
                f"{paths.predictions(name)}: covers other test images (or labels) than the CNN's; "
                f"re-run featurepipe extract and fit-heads --run {paths.root}"
            )
    cnn = read_json(paths.cnn_metrics) if paths.cnn_metrics.exists() else {}
    return Inputs(preds, {"cnn": cnn, **records})


def load_val(cfg: RunConfig, names) -> dict[str, Predictions]:
    """Each model's val predictions, where it wrote any (an empty val split, or a run older than them, has none)."""
    found = {}
    for name in names:
        path = cfg.paths.predictions(name, "val")
        if path.is_file():
            p = load_predictions(path, cfg.class_names)
            if len(p.ids):
                found[name] = p
    return found


def model_cost(name: str, info: dict[str, Any]) -> dict[str, float | None]:
    """Fit (training) time and prediction time per image, as train-cnn and fit-heads measured them."""
    return {"fit_seconds": info.get("train_seconds" if name == "cnn" else "fit_seconds"),
            "predict_seconds_per_image": info.get("predict_seconds_per_image")}


def features_of(name: str, cfg: RunConfig, info: dict[str, Any]) -> str:
    """What a model's input is, in words: the report says it beside every row."""
    arch = cfg.model.arch if cfg.model is not None else "the CNN"
    if name == "cnn":
        return f"{arch}, trained end to end" + (f" from {cfg.weights} weights" if cfg.weights else " from scratch")
    frozen = info.get("features", {}).get("frozen")
    if frozen:
        return f"{arch} with its {frozen} weights as they were, before any fine-tuning (frozen)"
    if info.get("inputs"):
        return "the probabilities of " + ", ".join(info["inputs"])
    return (f"the {'fine-tuned' if cfg.weights else 'trained'} CNN's embedding "
            f"({info.get('features', {}).get('layer', 'penultimate')})")
