"""compare: the report's numbers, files, pictures and refusals, on runs with known predictions."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics

from featurepipe.evaluate import Predictions, save_predictions
from featurepipe.models import fingerprint

from conftest import cli

HEAD_SKILL = {"cnn": 1.6, "logreg": 1.3, "svm": 1.6, "rf": 0.7}


def fake_run(root: Path, n_classes: int = 2, n_test: int = 90, heads=("logreg", "rf", "svm"), seed: int = 0,
             skill: dict[str, float] | None = None) -> Path:
    """A run directory as train-cnn/extract/fit-heads leave it, with made-up predictions that have errors.

    The checkpoint is a stand-in (only its fingerprint matters to compare), so Grad-CAM is off for it.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    names = [f"class{k}" for k in range(n_classes)]
    y = rng.permutation(np.arange(n_test) % n_classes)
    images = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    np.savez(root / "data.npz", train_images=images[:6], train_labels=np.arange(6) % n_classes,
             test_images=images, test_labels=y[:, None], class_names=np.array(names))
    ids = [f"test/{i:06d}" for i in range(n_test)]
    (root / "config.json").write_text(json.dumps({
        "data": {"source": str(root / "data.npz"), "class_names": names,
                 "counts": {"train": np.bincount(np.arange(6) % n_classes, minlength=n_classes).tolist()}},
        "train": {"seed": 0}, "model": {"arch": "sixblock", "img_size": 28, "in_channels": 1}}))
    (root / "splits.json").write_text(json.dumps({"train": [f"train/{i:06d}" for i in range(6)], "val": [],
                                                  "test": ids}))
    (root / "cnn").mkdir()
    (root / "cnn" / "model.pt").write_bytes(b"stand-in checkpoint")
    (root / "cnn" / "metrics.json").write_text(json.dumps({"train_seconds": 12.5, "predict_seconds_per_image": 1e-3,
                                                           "best_epoch": 2}))
    (root / "cnn" / "history.csv").write_text(
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_macro_f1,lr,seconds\n"
        "1,0.9,0.6,0.8,0.62,0.6,0.001,1.0\n2,0.5,0.8,0.6,0.75,0.74,0.001,1.0\n3,0.3,0.9,0.65,0.74,0.73,0.0,1.0\n")
    (root / "heads").mkdir()
    for name in ("cnn", *heads):
        logits = rng.normal(0, 1, (n_test, n_classes)) + {**HEAD_SKILL, **(skill or {})}[name] * np.eye(n_classes)[y]
        proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        folder, prefix = (root / "cnn", "") if name == "cnn" else (root / "heads", f"{name}.")
        save_predictions(folder / f"{prefix}test_predictions.csv", Predictions(ids, y, proba, names))
        if name != "cnn":
            (root / "heads" / f"{name}.joblib").write_bytes(b"")
            (root / "heads" / f"{name}.json").write_text(json.dumps({
                "checkpoint": fingerprint(root / "cnn" / "model.pt"), "params": {"clf__C": 1.0},
                "val_macro_f1": 0.8, "fit_seconds": 2.0, "predict_seconds_per_image": 2e-5}))
    return root


def read_predictions(path: Path, class_names: list[str]):
    """Straight from the CSV, without featurepipe's reader."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([class_names.index(r["true"]) for r in rows])
    proba = np.array([[float(r[f"p_{c}"]) for c in class_names] for r in rows])
    return [r["id"] for r in rows], y, proba


def prediction_file(run: Path, model: str) -> Path:
    return run / "cnn" / "test_predictions.csv" if model == "cnn" else run / "heads" / f"{model}.test_predictions.csv"


def assert_report_matches_sklearn(run: Path, out: Path | None = None) -> None:
    """Every figure of summary.json, per_class.csv and report.html, recomputed from the saved predictions
    with scikit-learn's and scipy's own functions."""
    out = out or run / "compare"
    summary = json.loads((out / "summary.json").read_text())
    names = summary["class_names"]
    k = len(names)
    html = (out / "report.html").read_text()
    with (out / "per_class.csv").open(newline="") as f:
        per_class = list(csv.DictReader(f))
    preds = {m: read_predictions(prediction_file(run, m), names) for m in summary["models"]}
    ids, y, ref = preds["cnn"]
    assert summary["test_size"] == len(y)
    for model, m in summary["models"].items():
        _, y_m, proba = preds[model]
        np.testing.assert_array_equal(y_m, y)
        pred = proba.argmax(axis=1)
        norm = proba / proba.sum(axis=1, keepdims=True)
        expected = {
            "accuracy": metrics.accuracy_score(y, pred),
            "balanced_accuracy": metrics.balanced_accuracy_score(y, pred),
            "log_loss": metrics.log_loss(y, norm, labels=range(k)),
            "roc_auc": metrics.roc_auc_score(y, proba[:, 1]) if k == 2 else
            metrics.roc_auc_score(y, norm, multi_class="ovr", average="macro"),
        }
        for avg in ("macro", "weighted"):
            kw = dict(labels=range(k), average=avg, zero_division=0)
            expected[f"{avg}_precision"] = metrics.precision_score(y, pred, **kw)
            expected[f"{avg}_recall"] = metrics.recall_score(y, pred, **kw)
            expected[f"{avg}_f1"] = metrics.f1_score(y, pred, **kw)
        # MedMNIST's evaluator (getAUC/getACC), written out as that package does.
        if k == 2:
            expected["medmnist_auc"] = metrics.roc_auc_score(y, proba[:, -1])
            expected["medmnist_acc"] = metrics.accuracy_score(y, proba[:, -1] > 0.5)
        else:
            expected["medmnist_auc"] = np.mean([metrics.roc_auc_score(y == c, proba[:, c]) for c in range(k)])
            expected["medmnist_acc"] = metrics.accuracy_score(y, pred)
        conf, right = norm.max(axis=1), pred == y
        bins = np.ceil(conf * 15).astype(int)
        expected["ece"] = sum(abs(right[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
                              for b in np.unique(bins))
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, abs=1e-9), (model, key)
        for key in ("accuracy", "macro_f1"):
            lo, hi = m[f"{key}_ci"]
            assert lo <= m[key] <= hi and 0 <= hi - lo < 0.5, (model, key)
            assert f"{m[key]:.4f} [{lo:.4f}, {hi:.4f}]" in html, (model, key)

        prf = metrics.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
        mcm = metrics.multilabel_confusion_matrix(y, pred, labels=range(k))
        rows = [r for r in per_class if r["model"] == model]
        assert [r["class"] for r in rows] == names
        for c, r in enumerate(rows):
            assert [float(r[f]) for f in ("precision", "recall", "f1")] == pytest.approx([v[c] for v in prf[:3]])
            assert [int(r[f]) for f in ("support", "tp", "tn", "fp", "fn")] == \
                [prf[3][c], mcm[c, 1, 1], mcm[c, 0, 0], mcm[c, 0, 1], mcm[c, 1, 0]]
            assert f"<td class=\"l\">{r['class']}</td><td>{float(r['precision']):.4f}</td>" in html

        if model != "cnn":
            t = summary["tests"][model]
            cnn_right = ref.argmax(axis=1) == y
            b, c = int((cnn_right & ~right).sum()), int((~cnn_right & right).sum())
            assert (t["mcnemar"]["cnn_only_right"], t["mcnemar"]["head_only_right"]) == (b, c)
            assert t["mcnemar"]["p_value"] == pytest.approx(sps.binomtest(c, b + c, 0.5).pvalue if b + c else 1.0)
            assert t["mcnemar"]["p_holm"] >= t["mcnemar"]["p_value"]
            assert t["delta_accuracy"] == pytest.approx(m["accuracy"] - summary["models"]["cnn"]["accuracy"])
            if k == 2:
                assert t["delong"]["auc_head"] == pytest.approx(metrics.roc_auc_score(y, proba[:, 1]))
                assert t["delong"]["auc_cnn"] == pytest.approx(metrics.roc_auc_score(y, ref[:, 1]))
            else:
                assert "delong" not in t


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    run = fake_run(tmp_path_factory.mktemp("binary") / "run", n_classes=2)
    cli("compare", "--run", run, "--no-gradcam")
    return run


def test_binary_report_agrees_with_sklearn(binary_run):
    assert_report_matches_sklearn(binary_run)


def test_multiclass_report_agrees_with_sklearn(tmp_path):
    run = fake_run(tmp_path / "run", n_classes=4, n_test=120, heads=("logreg", "svm"), seed=1)
    cli("compare", "--run", run, "--no-gradcam")
    assert_report_matches_sklearn(run)


def test_tiny_run_report_agrees_with_sklearn(tiny_run):
    assert_report_matches_sklearn(tiny_run)


def test_report_files_and_summary_contract(binary_run):
    out = binary_run / "compare"
    for name in ("summary.json", "summary.md", "report.html", "per_class.csv", "metrics.csv", "accuracy.png",
                 "macro_f1.png", "confusion.png", "reliability.png", "roc.png", "training_curves.png",
                 "top_losses.png"):
        assert (out / name).is_file(), name
    assert not (out / "gradcam.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bootstrap"]["resamples"] >= 1000 and summary["bootstrap"]["stratified"]
    assert set(summary["models"]) == {"cnn", "logreg", "rf", "svm"}
    cnn = summary["models"]["cnn"]
    assert cnn["fit_seconds"] == 12.5 and cnn["predict_seconds_per_image"] == 1e-3
    assert summary["models"]["svm"]["fit_seconds"] == 2.0
    assert len(summary["failures"]) == 18
    losses = [-np.log(f["cnn_p_true"]) for f in summary["failures"]]
    assert losses == sorted(losses, reverse=True)
    with (out / "metrics.csv").open(newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert float(rows["rf"]["accuracy"]) == pytest.approx(summary["models"]["rf"]["accuracy"])


def test_report_html_is_self_contained(binary_run):
    html = (binary_run / "compare" / "report.html").read_text()
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 7 and all(s.startswith("data:image/png;base64,") for s in images)
    for section in ("Is the difference real?", "Per class", "Calibration", "Where the CNN fails", "run config"):
        assert section in html


def test_summary_md_links_existing_charts(binary_run):
    out = binary_run / "compare"
    md = (out / "summary.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "accuracy.png" in links and all((out / link).is_file() for link in links)


def test_significance_detects_a_real_difference_and_not_a_null_one(tmp_path):
    run = fake_run(tmp_path / "run", n_classes=2, n_test=400, heads=("svm", "rf"), seed=2)
    cli("compare", "--run", run, "--no-gradcam")
    tests = json.loads((run / "compare" / "summary.json").read_text())["tests"]
    assert tests["rf"]["verdict"] == "CNN better"  # far weaker head on 400 images
    assert tests["rf"]["delta_accuracy_ci"][1] < 0
    # svm is drawn with the CNN's own skill: no difference to find.
    assert tests["svm"]["verdict"] == "no significant difference"
    assert tests["svm"]["delta_accuracy_ci"][0] < 0 < tests["svm"]["delta_accuracy_ci"][1]


def test_a_cnn_that_learned_nothing_is_named_and_no_head_wins_over_it(tmp_path):
    run = fake_run(tmp_path / "failed", n_classes=2, n_test=400, heads=("logreg",), seed=2, skill={"cnn": 0.0})
    cli("compare", "--run", run, "--no-gradcam")
    summary = json.loads((run / "compare" / "summary.json").read_text())
    base = summary["baseline"]
    assert base["accuracy"] == 0.5 and base["cnn_above"] is False  # balanced test set, CNN guessing
    assert summary["tests"]["logreg"]["verdict"] == "head better than a CNN that did not learn"
    for text in ((run / "compare" / "summary.md").read_text(), (run / "compare" / "report.html").read_text()):
        assert "did not learn" in text and "majority-class baseline" in text
        assert "Significantly better than the CNN:" not in text
    # A CNN that learned: above the baseline, and the usual verdicts.
    ok = fake_run(tmp_path / "ok", n_classes=2, n_test=400, heads=("logreg",), seed=2)
    cli("compare", "--run", ok, "--no-gradcam")
    summary = json.loads((ok / "compare" / "summary.json").read_text())
    assert summary["baseline"]["cnn_above"] is True and "did not learn" not in (ok / "compare" / "summary.md").read_text()


def test_heads_scored_on_other_images_are_refused(tmp_path):
    run = fake_run(tmp_path / "run")
    path = run / "heads" / "svm.test_predictions.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    r = cli("compare", "--run", run, ok=False)
    assert r.exit_code == 2 and "svm.test_predictions.csv" in r.output and "other test images" in r.output


def test_too_few_bootstrap_resamples_are_refused(binary_run):
    r = cli("compare", "--run", binary_run, "--bootstrap", "200", ok=False)
    assert r.exit_code == 2 and "--bootstrap 200" in r.output


def test_report_without_the_images_still_has_every_number(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "data.npz").unlink()
    r = cli("compare", "--run", run, "--no-gradcam")
    assert "Gallery and Grad-CAM skipped" in r.output
    out = run / "compare"
    assert not (out / "top_losses.png").exists()
    assert "Gallery and Grad-CAM skipped" in (out / "report.html").read_text()
    assert_report_matches_sklearn(run)


def test_several_runs_side_by_side(tmp_path):
    a = fake_run(tmp_path / "a" / "run", seed=0)
    b = fake_run(tmp_path / "b" / "run", seed=1)
    r = cli("compare", "--run", a, "--run", b, ok=False)
    assert r.exit_code == 2 and "--out" in r.output
    out = tmp_path / "joint"
    cli("compare", "--run", a, "--run", b, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["a/run", "b/run"]
    assert summary["same_test_images"] is True
    for label, run in (("a/run", a), ("b/run", b)):
        single = summary["runs"][label]["models"]
        _, y, proba = read_predictions(prediction_file(run, "svm"), summary["class_names"])
        assert single["svm"]["accuracy"] == pytest.approx(metrics.accuracy_score(y, proba.argmax(axis=1)))
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "a/run" in html and "b/run" in html
    assert (out / "accuracy.png").is_file() and (out / "macro_f1.png").is_file()
    assert not (a / "compare").exists()  # the joint report leaves the runs themselves alone


def test_several_runs_on_different_test_images_are_flagged(tmp_path):
    a = fake_run(tmp_path / "a", n_test=90)
    b = fake_run(tmp_path / "b", n_test=80)
    cli("compare", "--run", a, "--run", b, "--out", tmp_path / "joint")
    summary = json.loads((tmp_path / "joint" / "summary.json").read_text())
    assert summary["same_test_images"] is False
    assert "different test images" in (tmp_path / "joint" / "report.html").read_text()


@pytest.mark.parametrize("second,message", [("same", "given twice"), ("classes", "differ from the first run")])
def test_runs_that_cannot_be_compared_are_refused(tmp_path, second, message):
    a = fake_run(tmp_path / "a", n_classes=2)
    b = a if second == "same" else fake_run(tmp_path / "b", n_classes=3)
    r = cli("compare", "--run", a, "--run", b, "--out", tmp_path / "joint", ok=False)
    assert r.exit_code == 2 and message in r.output


def test_gradcam_of_the_trained_cnn_and_no_stale_picture(tiny_run, tmp_path):
    assert (tiny_run / "compare" / "gradcam.png").is_file()
    assert "gradcam" in json.loads((tiny_run / "compare" / "summary.json").read_text())["figures"]
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    cli("compare", "--run", run, "--no-gradcam")
    assert not (run / "compare" / "gradcam.png").exists()
    assert "Grad-CAM" not in (run / "compare" / "report.html").read_text().split("Where the CNN fails")[1]


@pytest.mark.parametrize("monitor, caption", [("none", "dotted: the final epoch, kept as --monitor none"),
                                              ("loss", "within one standard error of the best validation loss"),
                                              (None, "dotted: the epoch kept)")])
def test_the_training_curves_caption_says_which_epoch_the_run_kept(tmp_path, monitor, caption):
    run = fake_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    if monitor is not None:
        config["train"]["monitor"] = monitor
    (run / "config.json").write_text(json.dumps(config))
    cli("compare", "--run", run, "--no-gradcam")
    assert caption in (run / "compare" / "summary.md").read_text()
