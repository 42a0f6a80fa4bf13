"""Out-of-core heads: partial_fit over chunks of rows read from the HDF5 file, for features larger than memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.kernel_approximation import Nystroem
from sklearn.pipeline import Pipeline
from sklearn.utils.class_weight import compute_class_weight

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import macro_f1
from featurepipe.features import FeatureSplit, open_split
from featurepipe.heads.fitting import jsonable, predict_proba
from featurepipe.heads.registry import HeadSpec

ONLINE_EPOCHS = 10


def _chunks(n: int, chunk_rows: int, rng: np.random.Generator | None) -> list[list[slice]]:
    """Row ranges per chunk. Shuffled: each chunk joins 8 random blocks, so that features stored class
    by class (folder sources) still give every partial_fit call a mix of classes."""
    if rng is None:
        return [[slice(a, min(a + chunk_rows, n))] for a in range(0, n, chunk_rows)]
    block = max(1, chunk_rows // 8)
    blocks = [slice(a, min(a + block, n)) for a in range(0, n, block)]
    order = rng.permutation(len(blocks))
    return [[blocks[i] for i in sorted(order[k:k + 8])] for k in range(0, len(order), 8)]


def _read(features, ranges: list[slice]) -> np.ndarray:
    return np.concatenate([features[r] for r in ranges])


def fit_online(spec: HeadSpec, params: dict[str, Any], split: FeatureSplit, classes: np.ndarray, seed: int,
               chunk_rows: int, epochs: int = ONLINE_EPOCHS) -> Pipeline:
    """Fit without holding the features in memory: the scaler by partial_fit over the chunks, the steps
    between it and the classifier (normaliser, kernel map) on one chunk, the classifier by partial_fit
    over shuffled chunks for `epochs` passes. Class weights are balanced over all labels."""
    model = spec.build(seed, 1).set_params(**params)
    *prep, (_, clf) = model.steps
    weights = compute_class_weight("balanced", classes=np.unique(split.labels), y=split.labels)
    clf.set_params(class_weight=dict(zip(np.unique(split.labels).tolist(), weights)))
    n = len(split.labels)
    scaler = prep[0][1]
    for ranges in _chunks(n, chunk_rows, None):
        scaler.partial_fit(_read(split.features, ranges))
    rng = np.random.default_rng(seed)
    sample = scaler.transform(_read(split.features, _chunks(n, chunk_rows, rng)[0]))
    for _, step in prep[1:]:
        if isinstance(step, Nystroem):
            step.set_params(n_components=min(step.n_components, len(sample)))
        sample = step.fit(sample).transform(sample)

    def transform(X: np.ndarray) -> np.ndarray:
        for _, step in prep:
            X = step.transform(X)
        return X

    for _ in range(epochs):
        for ranges in _chunks(n, chunk_rows, rng):
            rows = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
            mix = rng.permutation(len(rows))
            clf.partial_fit(transform(_read(split.features, ranges))[mix], split.labels[rows][mix], classes=classes)
    return model


def _fit_score_online(spec: HeadSpec, params: dict[str, Any], path: Path, classes, seed: int, chunk_rows: int) -> float:
    with open_split(path, "train") as train, open_split(path, "val") as val:
        model = fit_online(spec, params, train, classes, seed, chunk_rows)
        proba = predict_proba(model, val.features, len(classes), chunk_rows)
        return macro_f1(val.labels, proba.argmax(axis=1))


def choose_online(spec: HeadSpec, path: Path, classes: np.ndarray, tune: str, seed: int, jobs: int,
                  chunk_rows: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    candidates = spec.candidates(tune)
    if len(candidates) == 1:
        return candidates[0], []
    if tune == "cv":
        raise FeaturepipeError("--tune cv: needs the train features in memory; out-of-core, use --tune val")
    results = Parallel(n_jobs=jobs)(
        delayed(_fit_score_online)(spec, p, path, classes, seed, chunk_rows) for p in candidates
    )
    table = [{"params": jsonable(p), "macro_f1": float(s)} for p, s in zip(candidates, results)]
    return candidates[int(np.argmax(results))], table
