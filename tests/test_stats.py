"""The statistics behind compare, each checked against a direct computation or scikit-learn/scipy."""

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from featurepipe import stats


def noisy_predictions(n=300, k=3, seed=0, skill=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + skill * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def test_stratified_resamples_keep_class_counts_and_are_seeded():
    y = np.array([0] * 50 + [1] * 7 + [2] * 3)
    idx = stats.stratified_resamples(y, 200, seed=3)
    assert idx.shape == (200, len(y))
    for row in idx:
        assert np.bincount(y[row], minlength=3).tolist() == [50, 7, 3]
    np.testing.assert_array_equal(idx, stats.stratified_resamples(y, 200, seed=3))
    assert not np.array_equal(idx, stats.stratified_resamples(y, 200, seed=4))


def test_resampled_macro_f1_of_many_classes_holds_no_confusion_matrix_per_resample():
    # compare on 1 000 classes was killed at 17.6 GB: resamples x classes x classes counts. 300 classes
    # here (720 MB that way) to keep a failure of this test from taking the machine.
    import tracemalloc

    y, proba = noisy_predictions(n=900, k=300)
    idx = stats.stratified_resamples(y, 1000, seed=0)
    tracemalloc.start()
    try:
        f1 = stats.macro_f1_rows(y, proba.argmax(axis=1), idx, n_classes=300)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, peak
    row = idx[0]
    assert f1[0] == pytest.approx(f1_score(y[row], proba.argmax(axis=1)[row], labels=range(300), average="macro",
                                           zero_division=0))


def test_resampled_accuracy_and_macro_f1_equal_sklearn_on_each_resample():
    y, proba = noisy_predictions(k=4, skill=0.8)
    pred = proba.argmax(axis=1)
    pred[pred == 3] = 0  # a class that is never predicted: its F1 is 0, as zero_division=0 says
    idx = stats.stratified_resamples(y, 25, seed=0)
    acc = stats.accuracy_rows(y, pred, idx)
    f1 = stats.macro_f1_rows(y, pred, idx, n_classes=4)
    for row, a, f in zip(idx, acc, f1):
        assert a == pytest.approx(accuracy_score(y[row], pred[row]))
        assert f == pytest.approx(f1_score(y[row], pred[row], labels=range(4), average="macro", zero_division=0))


def test_bootstrap_interval_has_the_binomial_width():
    y, proba = noisy_predictions(n=600, k=2, skill=1.2)
    pred = proba.argmax(axis=1)
    acc = accuracy_score(y, pred)
    lo, hi = stats.percentile_interval(stats.accuracy_rows(y, pred, stats.stratified_resamples(y, 2000, 0)))
    assert lo < acc < hi
    expected = 2 * 1.96 * np.sqrt(acc * (1 - acc) / len(y))
    assert hi - lo == pytest.approx(expected, rel=0.2)


def test_exact_mcnemar_counts_discordant_images_and_uses_the_binomial():
    a = np.array([1] * 20 + [1] * 3 + [0] * 10 + [0] * 5, bool)
    b = np.array([1] * 20 + [0] * 3 + [1] * 10 + [0] * 5, bool)
    r = stats.mcnemar_exact(a, b)
    assert (r.b, r.c) == (3, 10)
    assert r.p_value == pytest.approx(2 * sps.binom.cdf(3, 13, 0.5))
    assert stats.mcnemar_exact(b, a).p_value == pytest.approx(r.p_value)
    assert stats.mcnemar_exact(a, a).p_value == 1.0


def _delong_by_definition(y, s1, s2):
    """DeLong, DeLong & Clarke-Pearson (1988) written out with the explicit placement matrix."""
    def psi(x, z):
        return (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])

    v10, v01, aucs = [], [], []
    for s in (s1, s2):
        m = psi(s[y == 1], s[y == 0])
        aucs.append(m.mean())
        v10.append(m.mean(axis=1))
        v01.append(m.mean(axis=0))
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    cov = s10 / (y == 1).sum() + s01 / (y == 0).sum()
    z = (aucs[1] - aucs[0]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return aucs, z


def test_delong_matches_the_original_definition_and_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    s1 = np.round(y + rng.normal(0, 1.0, 150), 1)  # rounded: ties must count half
    s2 = np.round(y + rng.normal(0, 1.4, 150), 1)
    r = stats.delong_test(y, s1, s2)
    (auc1, auc2), z = _delong_by_definition(y, s1, s2)
    assert r.auc_a == pytest.approx(roc_auc_score(y, s1)) == pytest.approx(auc1)
    assert r.auc_b == pytest.approx(roc_auc_score(y, s2)) == pytest.approx(auc2)
    assert r.z == pytest.approx(z)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(abs(z)))
    swapped = stats.delong_test(y, s2, s1)
    assert swapped.z == pytest.approx(-r.z) and swapped.p_value == pytest.approx(r.p_value)


def test_delong_standard_error_agrees_with_the_bootstrap():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    s1, s2 = y + rng.normal(0, 1.0, 400), y + 0.5 * rng.normal(0, 1.0, 400) + 0.5 * rng.normal(0, 1.2, 400)
    r = stats.delong_test(y, s1, s2)
    se = abs(r.difference / r.z)
    diffs = [roc_auc_score(y[i], s2[i]) - roc_auc_score(y[i], s1[i])
             for i in stats.stratified_resamples(y, 600, seed=0)]
    assert se == pytest.approx(np.std(diffs), rel=0.15)


def test_delong_of_identical_scores_finds_no_difference():
    y, proba = noisy_predictions(k=2)
    r = stats.delong_test(y, proba[:, 1], proba[:, 1])
    assert r.p_value == 1.0 and r.difference == 0.0


def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
    assert stats.holm([0.6, 0.6]) == [1.0, 1.0]


def test_expected_calibration_error_by_hand():
    # Two bins used: (0.6, 0.667] holds 2 images, 1 right; (0.933, 1.0] holds 2, both right.
    y = np.array([0, 1, 0, 1])
    proba = np.array([[0.65, 0.35], [0.65, 0.35], [0.95, 0.05], [0.01, 0.99]])
    rel = stats.reliability(y, proba, n_bins=15)
    assert rel.count.sum() == 4 and (rel.count > 0).sum() == 2
    assert rel.ece == pytest.approx(0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.97))
    perfect = stats.reliability(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect.ece == 0.0


def test_medmnist_definitions():
    y = np.array([0, 1, 1, 0])
    proba = np.array([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    # Binary: the last column must exceed 0.5, so the tie in row 0 counts as class 0 (right).
    assert stats.medmnist_acc(y, proba) == 0.75
    assert stats.medmnist_auc(y, proba) == pytest.approx(roc_auc_score(y, proba[:, 1]))
    y3, p3 = noisy_predictions(k=3, skill=0.7)
    expected = np.mean([roc_auc_score(y3 == k, p3[:, k]) for k in range(3)])
    assert stats.medmnist_auc(y3, p3) == pytest.approx(expected)
    assert stats.medmnist_acc(y3, p3) == pytest.approx(accuracy_score(y3, p3.argmax(axis=1)))


def test_roc_auc_is_none_where_a_class_has_no_test_image():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    assert stats.roc_auc(np.array([0, 1]), proba) is None
    assert stats.medmnist_auc(np.array([0, 1]), proba) is None


def _recognised(rng, counts, recall):
    """Labels and predictions of a split with these class counts, each image right with its class's recall."""
    y = np.repeat(np.arange(len(counts)), counts)
    right = rng.random(len(y)) < np.asarray(recall)[y]
    return y, np.where(right, y, (y + 1) % len(counts))


def test_val_to_test_holds_its_level_under_another_class_mix_and_finds_a_real_drop():
    rng = np.random.default_rng(0)
    recall = [0.98, 0.90, 0.95]

    def rejected(test_recall, trials=1000):
        return np.mean([stats.val_to_test(*_recognised(rng, [40, 150, 60], recall),
                                          *_recognised(rng, [150, 60, 40], test_recall), 3).p_value < 0.05
                        for _ in range(trials)])

    # The same per-class recall on test, with its own class mix: accuracy moves, the test does not fire.
    assert 0.02 < rejected(recall) < 0.08
    # Each class recognised 8 points less often on test: found nearly every time.
    assert rejected([r - 0.08 for r in recall]) > 0.8
    # A class of test that val never shows: nothing to expect.
    assert stats.val_to_test(np.array([0, 0]), np.array([0, 0]), np.array([0, 1]), np.array([0, 1]), 2) is None


def test_val_to_test_holds_its_level_for_a_model_chosen_on_val_and_knows_when_it_cannot_tell():
    rng = np.random.default_rng(0)

    def rejected(chosen_among, trials=400):
        found = []
        for _ in range(trials):  # 12 candidates of one skill, the best on a 30-image val; test from the same pool
            best = max((_recognised(rng, [10] * 3, [0.8] * 3) for _ in range(12)), key=lambda c: np.mean(c[0] == c[1]))
            found.append(stats.val_to_test(*best, *_recognised(rng, [30] * 3, [0.8] * 3), 3, chosen_among).p_value
                         < 0.05)
        return np.mean(found)

    assert rejected(1) > 0.3  # its val score taken at face value: a drop found four times in ten
    assert rejected(12) <= 0.05
    right, wrong = np.array([0, 1]), np.array([1, 0])
    assert stats.val_to_test(right, right, right, wrong, 2, alpha=0.05).can_tell  # 1 image a class: z 2.31
    assert not stats.val_to_test(right, right, right, wrong, 2, alpha=0.05 / 6).can_tell
