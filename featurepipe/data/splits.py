"""Train/val/test assignment: the source's own split where it has one, a seeded stratified one where not.

Whatever the first command decides is saved in the run (`splits.json`, ids per split) and every later
command reuses it, so the CNN, the features and the heads all see exactly the same test images.
"""

from __future__ import annotations

import numpy as np

from featurepipe.data.sources import SPLITS, Catalog
from featurepipe.errors import FeaturepipeError

VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int, rest: str) -> dict[str, np.ndarray]:
    """Positions into `labels` for each named fraction, per class; what is left goes to `rest`.

    Each split gets round(fraction * N) images in all, shared out over the classes in proportion
    (largest remainder), and every class with enough images gets at least one in every split.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    taken = np.zeros(len(classes), dtype=np.int64)
    out: dict[str, list[int]] = {name: [] for name in [*fractions, rest]}
    for name, frac in fractions.items():
        quota = _apportion(counts, frac, available=counts - taken)
        for k, m in enumerate(members):
            out[name] += m[taken[k]:taken[k] + quota[k]].tolist()
        taken += quota
    for k, m in enumerate(members):
        out[rest] += m[taken[k]:].tolist()
    return {name: np.sort(np.array(v, dtype=np.int64)) for name, v in out.items()}


def _apportion(counts: np.ndarray, frac: float, available: np.ndarray) -> np.ndarray:
    exact = frac * counts
    quota = np.floor(exact).astype(np.int64)
    short = int(round(frac * counts.sum())) - int(quota.sum())
    for k in np.argsort(-(exact - quota), kind="stable")[:max(0, short)]:
        quota[k] += 1
    # Keep one image of each class in every split, and at least one for training.
    quota = np.maximum(quota, (available >= 2).astype(np.int64))
    return np.minimum(quota, np.maximum(available - 1, 0))


def assign_splits(catalog: Catalog, seed: int, saved: dict[str, list[str]] | None = None) -> dict[str, np.ndarray]:
    """Indices into the catalog for train, val and test."""
    if saved is not None:
        return _from_saved(catalog, saved)
    _check_classes(catalog.labels, catalog.class_names, "the data", need=3 if catalog.given_split is None else 1)
    if catalog.given_split is None:
        return stratified_split(catalog.labels, {"test": TEST_FRACTION, "val": VAL_FRACTION}, seed, rest="train")
    given = np.array(catalog.given_split)
    splits = {s: np.flatnonzero(given == s) for s in SPLITS}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise FeaturepipeError(f"{catalog.source}: needs both train and test images (found {', '.join(sorted(set(given)))})")
    _check_classes(catalog.labels[splits["train"]], catalog.class_names, "the train split", need=2)
    if len(splits["val"]) == 0:
        # Common Kaggle layout: train/ and test/ only. Carve a stratified val out of train.
        train = splits["train"]
        part = stratified_split(catalog.labels[train], {"val": VAL_FRACTION / (1 - TEST_FRACTION)}, seed, rest="train")
        splits["train"], splits["val"] = train[part["train"]], train[part["val"]]
    return splits


def _check_classes(labels: np.ndarray, names: list[str], where: str, need: int) -> None:
    if len(names) < 2:
        raise FeaturepipeError(f"{where} has a single class ({names[0] if names else 'none'}); a classifier needs two or more")
    counts = np.bincount(labels, minlength=len(names))
    for name, n in zip(names, counts):
        if n < need:
            raise FeaturepipeError(
                f"{where}: class '{name}' has {n} image(s); it needs at least {need} to appear in every split"
            )


def _from_saved(catalog: Catalog, saved: dict[str, list[str]]) -> dict[str, np.ndarray]:
    position = {id_: i for i, id_ in enumerate(catalog.ids)}
    splits = {}
    for s in SPLITS:
        ids = saved.get(s, [])
        missing = [i for i in ids if i not in position]
        if missing:
            raise FeaturepipeError(
                f"{catalog.source}: {len(missing)} image(s) of the run's {s} split are gone (e.g. {missing[0]}); "
                "the data changed since training, so train a new run"
            )
        splits[s] = np.array([position[i] for i in ids], dtype=np.int64)
    return splits


def split_ids(catalog: Catalog, splits: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {s: [catalog.ids[i] for i in idx] for s, idx in splits.items()}
