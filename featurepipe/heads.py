"""Classical heads on the CNN's embeddings: a registry of scikit-learn Pipelines, fitted on train.

- Every head is a Pipeline (its preprocessing, then the classifier as "clf"), class-balanced where the
  estimator supports it, with probabilities (Platt-calibrated for the SVMs).
- Hyperparameters: the head's defaults (`--tune none`), or the best of a small grid by macro F1 on the
  val split (`val`) or by stratified CV on train (`cv`). The test split is never used for a choice.
- Scale: `svm` switches to a Nystroem kernel map + linear SVM above `svm_exact_limit` training vectors.
  Heads with an online form (linsvm, logreg, and svm through Nystroem) fit out-of-core with
  `partial_fit` over chunks read from the HDF5 file, when the train features exceed `memory_bytes`
  or with `--out-of-core`. Grid points and CV folds are fitted in parallel with joblib (`--jobs`).
- `stack`: a logistic regression on the log-probabilities of the CNN and every other head, fitted
  on the val split (its C by stratified CV on val), scored on test.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import joblib
import numpy as np
import skops.io as sio
from joblib import Parallel, delayed, parallel_config
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_class_weight
from threadpoolctl import threadpool_limits

from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.evaluate import Predictions, load_predictions, macro_f1, save_evaluation, save_predictions, scores
from featurepipe.extract import FeatureSplit, open_split, read_attrs
from featurepipe.progress import log, progress_bar
from featurepipe.run_config import RunConfig
from featurepipe.runs import RunPaths, atomic_path, environment, require, run_paths, write_json

TUNE = ("none", "val", "cv")
STACK = "stack"
CV_FOLDS = 3
STACK_CV_FOLDS = 5
NYSTROEM_COMPONENTS = 1000
ONLINE_EPOCHS = 10


class CappedPCA(PCA):
    """PCA to at most n_components: fewer where the data has fewer features or rows than that."""

    @contextlib.contextmanager
    def _capped(self, X):
        wanted = self.n_components
        self.n_components = min(wanted, *np.shape(X))
        try:
            yield
        finally:
            self.n_components = wanted

    def fit(self, X, y=None):
        with self._capped(X):
            return super().fit(X, y)

    def fit_transform(self, X, y=None):
        with self._capped(X):
            return super().fit_transform(X, y)


def _prep(*, scale: bool = True, l2: bool = False, pca: int | None = None) -> list[tuple[str, Any]]:
    """The preprocessing steps a head needs: standardise, then optionally L2-normalise and PCA."""
    steps: list[tuple[str, Any]] = []
    if scale:
        steps.append(("scale", StandardScaler()))
    if l2:
        # Unit-length vectors make the RBF width and k-NN distances independent of the embedding's size.
        steps.append(("l2", Normalizer()))
    if pca:
        steps.append(("pca", CappedPCA(n_components=pca, random_state=0)))
    return steps


@dataclass
class HeadSpec:
    """How to build one head, its default hyperparameters and the small grid `--tune` searches."""

    build: Callable[[int, int], Pipeline]  # (seed, n_jobs) -> unfitted Pipeline, classifier last as "clf"
    defaults: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    calibrate: bool = False  # wrap the chosen classifier in Platt scaling to get probabilities
    online: str | None = None  # name of the spec that fits it out-of-core with partial_fit

    def candidates(self, tune: str) -> list[dict[str, Any]]:
        if tune == "none" or not self.grid:
            return [dict(self.defaults)]
        keys = list(self.grid)
        return [{**self.defaults, **dict(zip(keys, v))} for v in itertools.product(*(self.grid[k] for k in keys))]


def _sgd(loss: str) -> Callable[[int, int], Pipeline]:
    # `average` (ASGD) makes a few passes over the data converge close to the batch solver's optimum.
    return lambda seed, jobs: Pipeline([
        *_prep(), ("clf", SGDClassifier(loss=loss, alpha=1e-4, average=True, random_state=seed)),
    ])


HEADS: dict[str, HeadSpec] = {
    "svm": HeadSpec(
        lambda seed, jobs: Pipeline([
            *_prep(l2=True), ("clf", SVC(kernel="rbf", gamma=1.0, class_weight="balanced", random_state=seed)),
        ]),
        {"clf__C": 1.0, "clf__gamma": 1.0},
        {"clf__C": [0.3, 1.0, 3.0, 10.0], "clf__gamma": [0.5, 1.0, 2.0]},
        calibrate=True, online="svm-online",
    ),
    "linsvm": HeadSpec(
        lambda seed, jobs: Pipeline([*_prep(), ("clf", LinearSVC(class_weight="balanced", max_iter=5000))]),
        {"clf__C": 0.01},
        {"clf__C": [0.001, 0.01, 0.1, 1.0]},
        calibrate=True, online="linsvm-online",
    ),
    "logreg": HeadSpec(
        lambda seed, jobs: Pipeline([
            *_prep(), ("clf", LogisticRegression(class_weight="balanced", max_iter=3000)),
        ]),
        {"clf__C": 0.1},
        {"clf__C": [0.01, 0.1, 1.0, 10.0]},
        online="logreg-online",
    ),
    "rf": HeadSpec(
        # Trees need no scaling. Half-size bootstrap samples: ~40 % faster, same val accuracy here.
        lambda seed, jobs: Pipeline([
            ("clf", RandomForestClassifier(n_estimators=200, max_samples=0.5, class_weight="balanced_subsample",
                                           n_jobs=jobs, random_state=seed)),
        ]),
        {"clf__min_samples_leaf": 1},
        {"clf__min_samples_leaf": [1, 3]},
    ),
    "knn": HeadSpec(
        # k-NN has no class weights; distance weighting keeps a large k from drowning the minority class.
        lambda seed, jobs: Pipeline([
            *_prep(l2=True), ("clf", KNeighborsClassifier(weights="distance", n_jobs=jobs)),
        ]),
        {"clf__n_neighbors": 15},
        {"clf__n_neighbors": [5, 15, 31, 63]},
    ),
    "hgb": HeadSpec(
        # Boosting's cost grows with features x bins: 64 principal components and 63 bins fit ~10x faster
        # than 256 raw features and 255 bins, with the same val accuracy on PneumoniaMNIST embeddings.
        lambda seed, jobs: Pipeline([
            *_prep(pca=64),
            ("clf", HistGradientBoostingClassifier(max_iter=300, max_bins=63, early_stopping=True,
                                                   validation_fraction=0.1, class_weight="balanced",
                                                   random_state=seed)),
        ]),
        {"clf__learning_rate": 0.1, "clf__max_leaf_nodes": 15},
        {"clf__learning_rate": [0.05, 0.1], "clf__max_leaf_nodes": [15, 31]},
    ),
}
DEFAULT_HEADS = ("svm", "rf", "logreg")

# Forms used instead of a registered head: the kernel approximation of svm for many vectors, and the
# partial_fit forms of the linear heads. modified_huber is a smoothed hinge that has probabilities.
_NYSTROEM = HeadSpec(
    lambda seed, jobs: Pipeline([
        *_prep(l2=True), ("kernel", Nystroem(gamma=1.0, n_components=NYSTROEM_COMPONENTS, random_state=seed)),
        ("clf", LinearSVC(class_weight="balanced", max_iter=5000)),
    ]),
    {"clf__C": 1.0, "kernel__gamma": 1.0},
    {"clf__C": [0.3, 1.0, 3.0, 10.0], "kernel__gamma": [0.5, 1.0, 2.0]},
    calibrate=True,
)
_ONLINE_GRID = {"clf__alpha": [1e-5, 1e-4, 1e-3]}
_ONLINE: dict[str, HeadSpec] = {
    "svm-online": HeadSpec(
        lambda seed, jobs: Pipeline([
            *_prep(l2=True), ("kernel", Nystroem(gamma=1.0, n_components=NYSTROEM_COMPONENTS, random_state=seed)),
            ("clf", SGDClassifier(loss="modified_huber", alpha=1e-4, average=True, random_state=seed)),
        ]),
        {"clf__alpha": 1e-4}, _ONLINE_GRID,
    ),
    "linsvm-online": HeadSpec(_sgd("modified_huber"), {"clf__alpha": 1e-4}, _ONLINE_GRID),
    "logreg-online": HeadSpec(_sgd("log_loss"), {"clf__alpha": 1e-4}, _ONLINE_GRID),
}


def _log_proba(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-6, 1.0))


# Input: the base models' probabilities side by side, in the order the stack's json lists as "inputs".
_STACK = HeadSpec(
    lambda seed, jobs: Pipeline([
        ("logp", FunctionTransformer(_log_proba)),
        ("clf", LogisticRegression(class_weight="balanced", max_iter=3000)),
    ]),
    {"clf__C": 1.0},
    {"clf__C": [0.01, 0.1, 1.0, 10.0]},
)
NAMES = (*HEADS, STACK)

# What a head's .skops file may hold beyond skops's default-trusted scikit-learn types: the inner parts
# of the estimators above, and featurepipe's own two. Nothing else is ever instantiated on loading, so
# a planted or edited file cannot run code (the .joblib export can: featurepipe never loads it).
TRUSTED_TYPES = [
    "featurepipe.heads.CappedPCA",
    "featurepipe.heads._log_proba",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.tree._tree.Tree",
]


class SkipHead(Exception):
    """A head that cannot be fitted on these training vectors; fit-heads says why and goes on."""


@dataclass
class HeadsConfig:
    """Options of fit-heads."""

    tune: str = "val"
    jobs: int = -1
    out_of_core: bool = False  # also switched on when the train features exceed memory_bytes
    chunk_rows: int = 50_000
    svm_exact_limit: int = 20_000
    memory_bytes: int = field(default_factory=lambda: _physical_memory() // 4)

    def validate(self) -> None:
        if self.tune not in TUNE:
            raise FeaturepipeError(f"--tune {self.tune}: choose one of {', '.join(TUNE)}")
        if self.chunk_rows < 1:
            raise FeaturepipeError(f"--chunk-rows {self.chunk_rows}: must be at least 1")
        if self.jobs == 0:
            raise FeaturepipeError("--jobs 0: give a number of parallel jobs, or -1 for all cores")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def parse_heads(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise FeaturepipeError(
            f"--heads {text}: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(NAMES)}"
        )
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def one_thread_per_job():
    """Parallel work runs as joblib threads (`--jobs`), with every native pool (BLAS, OpenMP) held to one
    thread inside. On a busy 2-core machine OpenBLAS's own threads made a 0.2 s logistic regression take
    6 s and OpenMP doubled a boosting fit, and worker processes took seconds to start; the estimators'
    heavy loops release the GIL, so threads do run in parallel. Results do not depend on --jobs."""
    with threadpool_limits(limits=1), parallel_config(backend="threading"):
        yield


# ---------------------------------------------------------------------------------------------------
# Choosing hyperparameters and fitting, features in memory


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
        folds = _folds(y, cv_folds, seed)
        tasks = [(p, X[tr], y[tr], X[te], y[te]) for p in candidates for tr, te in folds]
    results = Parallel(n_jobs=jobs)(delayed(_fit_score)(base, *t) for t in tasks)
    per_candidate = np.array([r[0] for r in results]).reshape(len(candidates), -1).mean(axis=1)
    table = [{"params": _jsonable(p), "macro_f1": float(s)} for p, s in zip(candidates, per_candidate)]
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


def _folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
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


# ---------------------------------------------------------------------------------------------------
# Out-of-core: partial_fit over chunks of rows read from the HDF5 file


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
    table = [{"params": _jsonable(p), "macro_f1": float(s)} for p, s in zip(candidates, results)]
    return candidates[int(np.argmax(results))], table


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


# ---------------------------------------------------------------------------------------------------
# The command


def check_features(cfg: RunConfig) -> dict[str, Any]:
    """features.h5's attributes, refused unless they belong to the run's current checkpoint and classes."""
    paths = cfg.paths
    require(paths.features, "features file", f"run featurepipe extract --run {paths.root} first")
    attrs = read_attrs(paths.features)
    if attrs["checkpoint"] != cfg.checkpoint:
        raise FeaturepipeError(
            f"{paths.features}: extracted from another checkpoint than {paths.checkpoint}; "
            f"re-run featurepipe extract --run {paths.root}"
        )
    if attrs["class_names"] != cfg.class_names:
        raise FeaturepipeError(f"{paths.features}: its classes differ from the run's; re-run featurepipe extract")
    return attrs


def load_head(paths: RunPaths, name: str):
    """A fitted head, from its .skops file with only TRUSTED_TYPES allowed: never code from the run folder."""
    path = require(paths.head_safe(name), f"safe copy of head '{name}'",
                   f"re-fit it: featurepipe fit-heads --run {paths.root} --heads {name}")
    try:
        return sio.load(path, trusted=TRUSTED_TYPES)
    except Exception as e:  # untrusted types, a damaged zip, another skops version's format, ...
        raise FeaturepipeError(f"{path}: not a head featurepipe can load safely ({first_line(e)}); "
                               f"re-fit it: featurepipe fit-heads --run {paths.root} --heads {name}") from None


def fit_heads(run: str | Path, names: list[str], config: HeadsConfig | None = None) -> dict[str, dict[str, float]]:
    config = config or HeadsConfig()
    config.validate()
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    class_names, seed, current = cfg.class_names, cfg.seed, cfg.checkpoint
    attrs = check_features(cfg)
    base = [n for n in names if n != STACK]
    results = {}
    with open_split(paths.features, "train") as train, open_split(paths.features, "val") as val, \
            open_split(paths.features, "test") as test:
        n, dim = train.features.shape
        out_of_core = config.out_of_core or n * dim * 4 > config.memory_bytes
        if out_of_core and base:
            offline = [h for h in base if HEADS[h].online is None]
            if offline:
                raise FeaturepipeError(
                    f"--heads {','.join(offline)}: need the train features in memory ({n}×{dim} float32, "
                    f"{n * dim * 4 / 2**30:.1f} GiB); out-of-core only {', '.join(h for h in HEADS if HEADS[h].online)} fit"
                )
            log(f"out-of-core: {n}×{dim} train features, partial_fit over chunks of {config.chunk_rows} rows")
        else:
            train, val, test = (FeatureSplit(s.features[:], s.labels, s.ids) for s in (train, val, test))
        common = {"checkpoint": current, "seed": seed, "class_names": class_names, "n_train": n,
                  "features": {"arch": attrs["arch"], "layer": attrs["layer"], "tta": attrs["tta"], "dim": dim}}
        with progress_bar("head") as bar, one_thread_per_job():
            task = bar.add_task("fit heads", total=len(names), info="")
            for name in base:
                bar.update(task, info=name)
                t0 = time.perf_counter()
                try:
                    model, info = _fit_one(name, train, val, paths.features, len(class_names), seed, config,
                                           out_of_core)
                except SkipHead as e:
                    log(f"{name}: skipped: {e}")
                    bar.advance(task)
                    continue
                fit_seconds = time.perf_counter() - t0
                results[name] = _save_head(paths, name, model, info | common, fit_seconds, val, test, class_names,
                                           config.chunk_rows)
                bar.advance(task)
            if STACK in names:
                bar.update(task, info=STACK)
                results[STACK] = fit_stack(cfg, val, test, config.tune, config.jobs)
                bar.advance(task)
    return results


def _fit_one(name: str, train: FeatureSplit, val: FeatureSplit, path: Path, n_classes: int, seed: int,
             config: HeadsConfig, out_of_core: bool) -> tuple[Pipeline, dict[str, Any]]:
    spec, info = HEADS[name], {"head": name, "tuned_on": config.tune, "out_of_core": out_of_core}
    n = len(train.labels)
    if out_of_core:
        spec = _ONLINE[spec.online]
        classes = np.arange(n_classes)
        params, table = choose_online(spec, path, classes, config.tune, seed, config.jobs, config.chunk_rows)
        info["chunk_rows"] = config.chunk_rows
        model = fit_online(spec, params, train, classes, seed, config.chunk_rows)
    else:
        if name == "svm" and n > config.svm_exact_limit:
            spec = _NYSTROEM
        params, table, model = choose(spec, train.features, train.labels, val.features, val.labels, config.tune,
                                      seed, config.jobs)
        if model is None:
            model = fit_chosen(spec, params, train.features, train.labels, seed, config.jobs)
    if "kernel" in model.named_steps:
        reason = "out-of-core" if out_of_core else f"{n} training vectors > {config.svm_exact_limit}"
        components = model.named_steps["kernel"].n_components
        info["approximation"] = {"method": "nystroem", "n_components": components, "reason": reason,
                                 "n_train": n, "exact_limit": config.svm_exact_limit}
        log(f"{name}: Nystroem kernel approximation ({components} components) + linear SVM instead of the "
            f"exact RBF SVM ({reason})")
    info.update(params=_jsonable(params), candidates=table, grid=_jsonable(spec.grid) if table else {})
    return model, info


def _save_head(paths: RunPaths, name: str, model, info: dict[str, Any], fit_seconds: float, val: FeatureSplit,
               test: FeatureSplit, class_names: list[str], chunk_rows: int) -> dict[str, float]:
    k = len(class_names)
    val_pred = Predictions(val.ids, val.labels, predict_proba(model, val.features, k, chunk_rows), class_names)
    t0 = time.perf_counter()
    proba = predict_proba(model, test.features, k, chunk_rows)
    predict_seconds = time.perf_counter() - t0
    test_pred = Predictions(test.ids, test.labels, proba, class_names)
    return _write_head(paths, name, model, info, fit_seconds, predict_seconds, val_pred, test_pred)


def _write_head(paths: RunPaths, name: str, model, info: dict[str, Any], fit_seconds: float,
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


# ---------------------------------------------------------------------------------------------------
# The stack


def stack_inputs(cfg: RunConfig) -> list[str]:
    """The CNN and every head already fitted on the current checkpoint's features, stack excluded."""
    names = [h for h in cfg.fitted_heads() if h != STACK]
    for h in names:
        cfg.head_info(h)
    return ["cnn", *names]


def fit_stack(cfg: RunConfig, val: FeatureSplit, test: FeatureSplit, tune: str, jobs: int) -> dict[str, float]:
    """Fit the stacker on the val predictions of the CNN and the heads; C by stratified CV on val."""
    paths, class_names, seed = cfg.paths, cfg.class_names, cfg.seed
    t0 = time.perf_counter()
    inputs = stack_inputs(cfg)
    if len(inputs) < 2:
        raise FeaturepipeError(f"--heads stack: no fitted heads to combine with the CNN in {paths.heads}; "
                               "fit some first, e.g. --heads svm,logreg,stack")
    require(paths.predictions("cnn", "val"), "CNN val predictions",
            f"re-run featurepipe train-cnn --out {paths.root} --overwrite (older runs did not keep them)")
    P_val = _stacked(paths, inputs, "val", val.ids, class_names)
    P_test = _stacked(paths, inputs, "test", test.ids, class_names)
    y = np.asarray(val.labels)
    spec = _STACK
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
    return _write_head(paths, STACK, model, info, fit_seconds, predict_seconds, val_pred, test_pred)


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
    for tr, te in _folds(y, STACK_CV_FOLDS, seed):
        model = spec.build(seed, 1).set_params(**params).fit(X[tr], y[tr])
        out[te] = full_proba(model, X[te], n_classes)
    return out


def _coefficients(model: Pipeline, inputs: list[str], class_names: list[str]) -> dict[str, list[float]]:
    """The stacker's weight per input model (rows: classes, or one row for two classes)."""
    coef = model.named_steps["clf"].coef_
    k = len(class_names)
    return {name: coef[:, i * k:(i + 1) * k].round(4).tolist() for i, name in enumerate(inputs)}


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)

    return {k: plain(v) for k, v in params.items()}
