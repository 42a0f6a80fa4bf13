"""The four commands and the artifact contract that users and scripts rely on."""

import json

import h5py
import joblib
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.pipeline import Pipeline

from featurepipe.evaluate import load_predictions

from conftest import cli, prediction_file


def test_run_directory_layout(tiny_run):
    for rel in ["config.json", "splits.json", "cnn/model.pt", "cnn/history.csv", "cnn/test_predictions.csv", "cnn/val_predictions.csv",
                "cnn/classification_report.txt", "features.h5", "compare/summary.json", "compare/summary.md",
                "compare/accuracy.png"]:
        assert (tiny_run / rel).is_file(), rel
    for head in ("svm", "rf", "logreg"):
        assert (tiny_run / "heads" / f"{head}.joblib").is_file()
        assert (tiny_run / "heads" / f"{head}.test_predictions.csv").is_file()
        assert (tiny_run / "heads" / f"{head}.classification_report.txt").is_file()
    assert not list(tiny_run.rglob("*.tmp"))  # no leftovers of atomic writes


def test_config_records_options_data_seed_and_versions(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["train"]["seed"] == 0 and cfg["train"]["epochs"] == 4
    assert cfg["data"]["class_names"] == ["0", "1", "2"]
    assert cfg["data"]["source"].endswith("tiny.npz")
    assert cfg["model"]["img_size"] == 28
    for lib in ("torch", "torchvision", "scikit-learn", "numpy", "h5py", "python"):
        assert cfg["environment"][lib]


def test_history_has_one_row_per_epoch(tiny_run):
    lines = (tiny_run / "cnn" / "history.csv").read_text().splitlines()
    assert lines[0].split(",")[:6] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                       "val_macro_f1"]
    assert len(lines) == 1 + 4


def test_features_h5_contract(tiny_run):
    splits = json.loads((tiny_run / "splits.json").read_text())
    with h5py.File(tiny_run / "features.h5") as h5:
        assert json.loads(h5.attrs["class_names"]) == ["0", "1", "2"]
        assert h5.attrs["arch"] == "sixblock" and h5.attrs["layer"] == "penultimate"
        assert len(h5.attrs["checkpoint"]) == 16
        for split, n in [("train", 120), ("val", 30), ("test", 36)]:
            g = h5[split]
            assert g["features"].dtype == np.float32 and g["features"].shape == (n, 256)
            assert g["labels"].dtype == np.int64 and g["labels"].shape == (n,)
            assert list(g["ids"].asstr()[:]) == splits[split]
            assert np.isfinite(g["features"][:]).all()


def test_heads_are_sklearn_pipelines_that_predict(tiny_run):
    with h5py.File(tiny_run / "features.h5") as h5:
        X = h5["test/features"][:]
    for head in ("svm", "rf", "logreg"):
        model = joblib.load(tiny_run / "heads" / f"{head}.joblib")
        assert isinstance(model, Pipeline)
        proba = model.predict_proba(X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


def test_summary_contract_agrees_with_sklearn(tiny_run):
    summary = json.loads((tiny_run / "compare" / "summary.json").read_text())
    assert summary["test_size"] == 36 and summary["class_names"] == ["0", "1", "2"]
    assert set(summary["models"]) == {"cnn", "svm", "rf", "logreg"}
    for name, m in summary["models"].items():
        p = load_predictions(prediction_file(tiny_run, name), summary["class_names"])
        assert m["accuracy"] == pytest.approx(accuracy_score(p.y_true, p.y_pred))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(p.y_true, p.y_pred))
        assert m["macro_f1"] == pytest.approx(f1_score(p.y_true, p.y_pred, average="macro"))
        assert m["weighted_f1"] == pytest.approx(f1_score(p.y_true, p.y_pred, average="weighted"))
    md = (tiny_run / "compare" / "summary.md").read_text()
    assert "| cnn |" in md and "accuracy.png" in md


def test_learns_the_tiny_task(tiny_run):
    summary = json.loads((tiny_run / "compare" / "summary.json").read_text())
    # Three classes, chance is 0.33; the patterns are easy, so every model must be far above it.
    assert min(m["accuracy"] for m in summary["models"].values()) >= 0.8


def test_stale_features_after_retraining_are_refused(tiny_run, tmp_path):
    import shutil

    import torch

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    ckpt = torch.load(run / "cnn" / "model.pt", weights_only=True)
    ckpt["epoch"] = 99  # any change to the checkpoint changes its fingerprint
    torch.save(ckpt, run / "cnn" / "model.pt")
    r = cli("fit-heads", "--run", run, ok=False)
    assert r.exit_code == 2 and "another checkpoint" in r.output
    r = cli("compare", "--run", run, ok=False)
    assert r.exit_code == 2 and "older checkpoint" in r.output


def test_config_records_a_data_fingerprint(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert len(cfg["data"]["fingerprint"]) == 16 and cfg["environment"]["git_commit"] is not None
