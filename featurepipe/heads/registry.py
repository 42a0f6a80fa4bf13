"""The heads fit-heads offers, one `HeadSpec` each, and the forms used in their place (kernel
approximation, out-of-core, the stack's own): every head is a scikit-learn Pipeline, its
preprocessing then the classifier as "clf", with its default hyperparameters and the grid --tune searches."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from featurepipe.errors import FeaturepipeError

STACK = "stack"
NYSTROEM_COMPONENTS = 1000


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
NYSTROEM = HeadSpec(
    lambda seed, jobs: Pipeline([
        *_prep(l2=True), ("kernel", Nystroem(gamma=1.0, n_components=NYSTROEM_COMPONENTS, random_state=seed)),
        ("clf", LinearSVC(class_weight="balanced", max_iter=5000)),
    ]),
    {"clf__C": 1.0, "kernel__gamma": 1.0},
    {"clf__C": [0.3, 1.0, 3.0, 10.0], "kernel__gamma": [0.5, 1.0, 2.0]},
    calibrate=True,
)
ONLINE_GRID = {"clf__alpha": [1e-5, 1e-4, 1e-3]}
ONLINE: dict[str, HeadSpec] = {
    "svm-online": HeadSpec(
        lambda seed, jobs: Pipeline([
            *_prep(l2=True), ("kernel", Nystroem(gamma=1.0, n_components=NYSTROEM_COMPONENTS, random_state=seed)),
            ("clf", SGDClassifier(loss="modified_huber", alpha=1e-4, average=True, random_state=seed)),
        ]),
        {"clf__alpha": 1e-4}, ONLINE_GRID,
    ),
    "linsvm-online": HeadSpec(_sgd("modified_huber"), {"clf__alpha": 1e-4}, ONLINE_GRID),
    "logreg-online": HeadSpec(_sgd("log_loss"), {"clf__alpha": 1e-4}, ONLINE_GRID),
}


def log_proba(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-6, 1.0))


# Input: the base models' probabilities side by side, in the order the stack's json lists as "inputs".
STACK_SPEC = HeadSpec(
    lambda seed, jobs: Pipeline([
        ("logp", FunctionTransformer(log_proba)),
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
    "featurepipe.heads.registry.CappedPCA",
    "featurepipe.heads.registry.log_proba",
    # The same two in heads saved before featurepipe.heads was a package (it still exports them there).
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


def parse_heads(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise FeaturepipeError(
            f"--heads {text}: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(NAMES)}"
        )
    return list(dict.fromkeys(names))
