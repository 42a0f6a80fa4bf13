"""Statistics for comparing classifiers on one test set: bootstrap intervals, paired tests, calibration.

Every function takes plain arrays (integer labels, predicted labels or probabilities) so it can be
checked against a hand computation; `report.py` decides what to compare with what.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

ECE_BINS = 15  # Guo et al. (2017), "On calibration of modern neural networks"


def stratified_resamples(y_true: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) indices drawn with replacement within each true class.

    Every resample keeps the test set's class counts, so a rare class never vanishes from a
    resample and the intervals describe the test set as it was drawn.
    """
    rng = np.random.default_rng(seed)
    columns = []
    for c in np.unique(y_true):
        members = np.flatnonzero(y_true == c)
        columns.append(members[rng.integers(0, len(members), size=(n_resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def accuracy_rows(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Accuracy of every resample (row of `idx`)."""
    return (y_true == y_pred)[idx].mean(axis=1)


def macro_f1_rows(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 of every resample, over all `n_classes` (F1 = 2TP / (2TP + FP + FN), 0 where undefined,
    as scikit-learn's f1_score with zero_division=0)."""
    # Counts per resample and class, not a confusion matrix per resample: that is resamples x k x k
    # (8 GB for 1 000 resamples of 1 000 classes).
    k, n = n_classes, len(idx)
    rows = np.arange(n)[:, None] * k
    truth, pred = y_true[idx], y_pred[idx]

    def counts(cells: np.ndarray) -> np.ndarray:
        return np.bincount(cells.ravel(), minlength=n * k).reshape(n, k)

    tp = counts((rows + truth)[truth == pred])
    denom = counts(rows + truth) + counts(rows + pred)  # (TP + FN) + (TP + FP)
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=denom > 0)
    return f1.mean(axis=1)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


@dataclass
class McNemar:
    """Exact McNemar test of two classifiers on the same images.

    b: images `a` gets right and `b` wrong; c: the reverse. Under the null hypothesis that both err
    equally often, c ~ Binomial(b + c, 1/2); the two-sided exact p-value.
    """

    b: int
    c: int
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    p = 1.0 if b + c == 0 else float(sps.binomtest(c, b + c, 0.5).pvalue)
    return McNemar(b, c, min(1.0, p))


@dataclass
class DeLong:
    """DeLong's test of two correlated ROC-AUCs (same images), fast version of Sun & Xu (2014)."""

    auc_a: float
    auc_b: float
    z: float
    p_value: float

    @property
    def difference(self) -> float:
        return self.auc_b - self.auc_a


# The test's variance is estimated from each class's images: one image of a class leaves it undefined.
DELONG_MIN = 2


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> DeLong:
    """`y_true` binary (1 = positive); scores: higher means more likely positive."""
    y_true = np.asarray(y_true)
    scores = np.vstack([score_a, score_b]).astype(np.float64)
    pos, neg = scores[:, y_true == 1], scores[:, y_true == 0]
    m, n = pos.shape[1], neg.shape[1]
    if min(m, n) < DELONG_MIN:
        raise ValueError(f"DeLong's test needs {DELONG_MIN} test images of each class")
    # Midranks give ties half credit, as the Mann–Whitney statistic (= the AUC) does.
    tx = np.apply_along_axis(sps.rankdata, 1, pos)
    ty = np.apply_along_axis(sps.rankdata, 1, neg)
    tz = np.apply_along_axis(sps.rankdata, 1, np.hstack([pos, neg]))
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives that outrank it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = auc[1] - auc[0]
    if var <= 1e-15:
        # Identical rankings: no evidence of any difference.
        return DeLong(float(auc[0]), float(auc[1]), 0.0, 1.0)
    z = diff / np.sqrt(var)
    return DeLong(float(auc[0]), float(auc[1]), float(z), float(2 * sps.norm.sf(abs(z))))


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error over several heads tested against one CNN)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


@dataclass
class CorrectedT:
    mean: float  # mean paired difference over the folds
    se: float  # its corrected standard error
    t: float
    df: int
    p_value: float


def corrected_resampled_ttest(differences: np.ndarray, n_train: float, n_test: float) -> CorrectedT:
    """Nadeau and Bengio's (2003) corrected resampled t-test of k paired differences (head minus CNN, one
    per fold). The folds' training sets overlap, so the differences are correlated and the plain paired
    t-test's variance s²/k is too small; the correction replaces it by (1/k + n_test/n_train) s², with
    k - 1 degrees of freedom. Two-sided."""
    d = np.asarray(differences, dtype=np.float64)
    k = len(d)
    mean = float(d.mean())
    var = float(d.var(ddof=1)) if k > 1 else 0.0
    se = float(np.sqrt((1.0 / k + n_test / n_train) * var))
    if se == 0.0:  # identical differences in every fold: no spread to test against
        return CorrectedT(mean, 0.0, 0.0 if mean == 0 else float(np.sign(mean) * np.inf), k - 1,
                          1.0 if mean == 0 else 0.0)
    t = mean / se
    return CorrectedT(mean, se, float(t), k - 1, float(2 * sps.t.sf(abs(t), k - 1)))


@dataclass
class ValToTest:
    """Does a model score lower on test than its val scores predict?

    expected: the test accuracy it would have if it recognised each class of test as often as it did on
    val (val's per-class recall weighted by test's class shares, so a different class mix alone is no
    drop); observed: its test accuracy. optimism: what choosing the model on val (the best of
    `chosen_among` candidates) adds to its val score by chance, at most the val score's standard error
    times sqrt(2 ln N) (the bound on the expected maximum of N noisy scores). z and the one-sided p test
    expected - optimism - observed against the binomial noise of both splits' per-class recalls.
    can_tell: whether any result could be significant at `alpha` (all of val right, all of test wrong);
    where not, val and test are too small for the check.
    """

    expected: float
    observed: float
    optimism: float
    z: float
    p_value: float
    can_tell: bool


def val_to_test(val_true: np.ndarray, val_pred: np.ndarray, test_true: np.ndarray, test_pred: np.ndarray,
                n_classes: int, chosen_among: int = 1, alpha: float = 0.05) -> ValToTest | None:
    """None where a class of test has no val image: val says nothing of how it is recognised."""
    n_val = np.bincount(val_true, minlength=n_classes)
    n_test = np.bincount(test_true, minlength=n_classes)
    present = n_test > 0
    if (n_val[present] == 0).any():
        return None
    share = n_test[present] / n_test.sum()
    n_val, n_test = n_val[present], n_test[present]
    hits_val = np.bincount(val_true, weights=val_pred == val_true, minlength=n_classes)[present]
    hits_test = np.bincount(test_true, weights=test_pred == test_true, minlength=n_classes)[present]

    def variance(hits, n):  # of each recall, from (hits + 1/2) / (n + 1): a class recognised every time still has noise
        r = (hits + 0.5) / (n + 1)
        return r * (1 - r) / n

    def z(hits_val, hits_test):
        optimism = float(np.sqrt(share ** 2 @ variance(hits_val, n_val)) * np.sqrt(2 * np.log(max(chosen_among, 1))))
        se = float(np.sqrt(share ** 2 @ (variance(hits_val, n_val) + variance(hits_test, n_test))))
        return optimism, (share @ (hits_val / n_val) - optimism - share @ (hits_test / n_test)) / se

    optimism, z_seen = z(hits_val, hits_test)
    can_tell = bool(sps.norm.sf(z(n_val, np.zeros_like(hits_test))[1]) < alpha)
    return ValToTest(float(share @ (hits_val / n_val)), float(share @ (hits_test / n_test)), optimism, float(z_seen),
                     float(sps.norm.sf(z_seen)), can_tell)


@dataclass
class Reliability:
    """Top-label calibration in equal-width confidence bins ((m-1)/M, m/M]."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray  # mean top-label probability per bin (nan where empty)
    accuracy: np.ndarray  # share of correct top labels per bin (nan where empty)

    @property
    def ece(self) -> float:
        """Expected calibration error: Σ |B_m|/n · |acc(B_m) − conf(B_m)|."""
        used = self.count > 0
        gap = np.abs(self.accuracy[used] - self.confidence[used])
        return float((self.count[used] * gap).sum() / self.count.sum())


def reliability(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> Reliability:
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return Reliability(edges, count, mean_conf, mean_acc)


def roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """ROC-AUC of the positive (second) class for two classes, macro one-vs-rest for more.

    None where it is undefined: a class of the run has no test image.
    """
    n_classes = proba.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    return float(roc_auc_score(y_true, proba / proba.sum(axis=1, keepdims=True), multi_class="ovr",
                               average="macro", labels=np.arange(n_classes)))


def medmnist_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """AUC as MedMNIST's evaluator (medmnist.evaluator.getAUC) defines it, for comparison with its tables:
    binary: ROC-AUC of the last column; multi-class: unweighted mean of one-vs-rest AUCs."""
    if len(np.unique(y_true)) < proba.shape[1]:
        return None
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, -1]))
    return float(np.mean([roc_auc_score(y_true == k, proba[:, k]) for k in range(proba.shape[1])]))


def medmnist_acc(y_true: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> float:
    """ACC as medmnist.evaluator.getACC: binary thresholds the last column (> 0.5), else argmax."""
    pred = (proba[:, -1] > threshold).astype(int) if proba.shape[1] == 2 else proba.argmax(axis=1)
    return float((pred == y_true).mean())
