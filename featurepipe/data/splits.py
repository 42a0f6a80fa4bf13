"""Train/val/test assignment: the source's own split where it has one, a seeded stratified one where not.

Whatever the first command decides is saved in the run (`splits.json`, ids per split) and every later
command reuses it, so the CNN, the features and the heads all see exactly the same test images.
Where the source has groups (a CSV `group` column: patient or study), every split featurepipe makes
keeps each group whole: images of one patient in train and test would inflate the test scores.
"""

from __future__ import annotations

import numpy as np

from featurepipe.data.sources import SPLITS, Catalog
from featurepipe.errors import FeaturepipeError
from featurepipe.progress import log

VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int, rest: str,
                     groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Positions into `labels` for each named fraction, per class; what is left goes to `rest`.

    Each split gets round(fraction * N) images in all, shared out over the classes in proportion
    (largest remainder), and every class with enough images gets at least one in every split.
    With `groups`, each group goes whole into one split (see stratified_group_split).
    """
    if groups is not None:
        return stratified_group_split(labels, groups, fractions, seed, rest)
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


def stratified_group_split(labels: np.ndarray, groups: np.ndarray, fractions: dict[str, float], seed: int,
                           rest: str) -> dict[str, np.ndarray]:
    """stratified_split where every group lands whole in one split.

    Groups are placed one at a time into the split whose per-class shortfall they fill best, a split
    still lacking one of the group's classes first. Groups of the rarest classes go first, so every
    split can still receive each class; then large groups before small ones, as in bin packing.
    """
    names = [*fractions, rest]
    share = np.array([*fractions.values(), 1.0 - sum(fractions.values())])
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    _, cls = np.unique(labels, return_inverse=True)
    counts = np.zeros((group.max() + 1, cls.max() + 1))
    np.add.at(counts, (group, cls), 1)
    total = counts.sum(0)
    target = share[:, None] * total
    have = np.zeros_like(target)
    rarity = np.where(counts > 0, (counts > 0).sum(0), np.inf).min(1)
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.lexsort((-counts[order].sum(1), rarity[order]))]
    placed = np.empty(len(counts), dtype=np.int64)
    for g in order:
        v = counts[g]
        # Change in squared shortfall, each class relative to its size so rare classes count as much.
        cost = (((have + v - target) ** 2 - (have - target) ** 2) / total**2).sum(1)
        brings = ((have == 0) & (v > 0) & (target > 0)).sum(1)
        placed[g] = s = min(range(len(names)), key=lambda k: (-brings[k], cost[k]))
        have[s] += v
    where = placed[group]
    return {name: np.flatnonzero(where == k) for k, name in enumerate(names)}


def assign_splits(catalog: Catalog, seed: int, saved: dict[str, list[str]] | None = None) -> dict[str, np.ndarray]:
    """Indices into the catalog for train, val and test."""
    if saved is not None:
        return _from_saved(catalog, saved)
    groups = None if catalog.groups is None else np.asarray(catalog.groups)
    if catalog.given_split is None:
        _check_classes(catalog.labels, catalog.class_names, catalog.source, need=3, groups=groups)
        splits = stratified_split(catalog.labels, {"test": TEST_FRACTION, "val": VAL_FRACTION}, seed, rest="train",
                                  groups=groups)
        check_splits(catalog, splits)
        return splits
    _check_classes(catalog.labels, catalog.class_names, catalog.source, need=1)
    given = np.array(catalog.given_split)
    splits = {s: np.flatnonzero(given == s) for s in SPLITS}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise FeaturepipeError(f"{catalog.source}: needs both train and test images (found {', '.join(sorted(set(given)))})")
    train = splits["train"]
    train_groups = None if groups is None else groups[train]
    _check_classes(catalog.labels[train], catalog.class_names, f"{catalog.source}: the train split", need=2,
                   groups=train_groups)
    if len(splits["val"]) == 0:
        # Common Kaggle layout: train/ and test/ only. Carve a stratified val out of train.
        part = stratified_split(catalog.labels[train], {"val": VAL_FRACTION / (1 - TEST_FRACTION)}, seed, rest="train",
                                groups=train_groups)
        splits["train"], splits["val"] = train[part["train"]], train[part["val"]]
    broken = broken_groups(catalog, splits)
    if broken:
        log(f"warning: {len(broken)} group(s) of {catalog.source} have images in more than one of its splits "
            f"(e.g. '{next(iter(broken))}'), which inflates test scores; featurepipe data inspect lists them")
    check_splits(catalog, splits)
    return splits


def check_splits(catalog: Catalog, splits: dict[str, np.ndarray], why: str = "") -> None:
    """Every split holds every class: a class missing from val or test cannot be scored.

    `why` explains how a class went missing (e.g. after unreadable images were skipped).
    """
    for split in SPLITS:
        counts = np.bincount(catalog.labels[splits[split]], minlength=len(catalog.class_names))
        for name, n in zip(catalog.class_names, counts):
            if n == 0:
                raise FeaturepipeError(
                    f"{catalog.source}: the {split} split has no image of class '{name}'{why}; "
                    "every split needs images of every class"
                )


def broken_groups(catalog: Catalog, splits: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Groups with images in more than one split, and how many in each."""
    if catalog.groups is None:
        return {}
    seen: dict[str, dict[str, int]] = {}
    for split, idx in splits.items():
        for i in idx:
            per_split = seen.setdefault(catalog.groups[i], {})
            per_split[split] = per_split.get(split, 0) + 1
    return {g: per_split for g, per_split in seen.items() if len(per_split) > 1}


def _check_classes(labels: np.ndarray, names: list[str], where: str, need: int, groups: np.ndarray | None = None) -> None:
    if len(names) < 2:
        raise FeaturepipeError(f"{where} has a single class ({names[0] if names else 'none'}); a classifier needs two or more")
    counts = np.bincount(labels, minlength=len(names))
    for k, (name, n) in enumerate(zip(names, counts)):
        if n < need:
            raise FeaturepipeError(
                f"{where}: class '{name}' has {n} image(s); it needs at least {need} to appear in every split"
            )
        if groups is not None and (g := len(set(groups[labels == k]))) < need:
            raise FeaturepipeError(
                f"{where}: class '{name}' occurs in {g} group(s); it needs at least {need} to appear in every "
                "split without splitting a group"
            )


def _from_saved(catalog: Catalog, saved: dict[str, list[str]]) -> dict[str, np.ndarray]:
    position = {id_: i for i, id_ in enumerate(catalog.ids)}
    splits = {}
    for s in SPLITS:
        ids = saved.get(s, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise FeaturepipeError(f"splits.json: its '{s}' entry is not a list of image ids; the run is damaged, "
                                   "train a new run")
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


def kfold(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None,
          holder: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions into `labels` for each of `folds` stratified folds; with `groups`, each
    group in one fold (as every split featurepipe makes). `holder` names what the positions index, for
    the error where there are fewer groups than folds. Both k-folds (train-cnn --folds and crossval)
    cut here, so a seed gives the same folds in either."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    positions = np.arange(len(labels))
    if groups is None:
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(positions, labels))
    if len(np.unique(groups)) < folds:
        raise FeaturepipeError(f"--folds {folds}: {holder} only {len(np.unique(groups))} groups; use fewer folds")
    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(positions, labels, groups))
