"""The four commands and the artifact contract that users and scripts rely on."""

import json
import subprocess
import sys

import h5py
import joblib
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.pipeline import Pipeline

from featurepipe.evaluate import load_predictions

from conftest import cli


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


def test_features_match_the_models_own_embedding(tiny_run):
    import torch

    from featurepipe.data import scan
    from featurepipe.models import load_checkpoint

    net, _ = load_checkpoint(tiny_run / "cnn" / "model.pt")
    cat = scan(json.loads((tiny_run / "config.json").read_text())["data"]["source"])
    first = cat.ids.index("test/000000")
    x = torch.from_numpy(cat.store.read(first, 28, 1)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net.forward_features(x).numpy()[0]
    with h5py.File(tiny_run / "features.h5") as h5:
        np.testing.assert_allclose(h5["test/features"][0], expected, rtol=1e-4, atol=1e-5)


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
        folder = "cnn" if name == "cnn" else "heads"
        prefix = "" if name == "cnn" else f"{name}."
        p = load_predictions(tiny_run / folder / f"{prefix}test_predictions.csv", summary["class_names"])
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


def test_extract_another_source_into_its_own_file(tiny_run, tmp_path, npz_file):
    out = tmp_path / "other.h5"
    cli("extract", "--run", tiny_run, "--data", npz_file, "--out", out)
    with h5py.File(out) as h5:
        assert h5["test/features"].shape == (36, 256)
        assert h5.attrs["source"] == str(npz_file)


@pytest.mark.parametrize("command", ["extract", "fit-heads", "compare"])
def test_commands_out_of_order_are_refused_clearly(tmp_path, command):
    r = cli(command, "--run", tmp_path / "missing", ok=False)
    assert r.exit_code == 2
    assert "train-cnn" in r.output


def test_fit_heads_before_extract_is_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    r = cli("fit-heads", "--run", run, ok=False)
    assert r.exit_code == 2 and "featurepipe extract" in r.output


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


def test_unknown_head_is_refused(tiny_run):
    r = cli("fit-heads", "--run", tiny_run, "--heads", "svm,xgboost", ok=False)
    assert r.exit_code == 2 and "xgboost" in r.output


def test_training_into_a_finished_run_needs_overwrite(tiny_run, npz_file):
    r = cli("train-cnn", "--data", npz_file, "--out", tiny_run, ok=False)
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_bad_input_gives_one_line_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "featurepipe", "train-cnn", "--data", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"featurepipe: error: --data {tmp_path / 'nope'}: no such file or folder; "
                     "give an image folder, a CSV, an .npz or 'demo'"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_features_read_back_the_same(tiny_run, tmp_path, compression):
    source = json.loads((tiny_run / "config.json").read_text())["data"]["source"]
    out = tmp_path / f"{compression}.h5"
    cli("extract", "--run", tiny_run, "--data", source, "--out", out, "--device", "cpu", "--compression", compression)
    with h5py.File(out) as packed, h5py.File(tiny_run / "features.h5") as plain:
        for split in ("train", "val", "test"):
            assert packed[split]["features"].compression == compression
            np.testing.assert_array_equal(packed[split]["features"][:], plain[split]["features"][:])
            np.testing.assert_array_equal(packed[split]["labels"][:], plain[split]["labels"][:])
    r = cli("extract", "--run", tiny_run, "--compression", "zip", ok=False)
    assert r.exit_code == 2 and "--compression zip: choose one of none, gzip, lzf" in r.output


@pytest.mark.parametrize("option,value,message", [
    ("--img-size", "16", "too small"),
    ("--arch", "alexnet9", "--arch alexnet9: choose one of auto, sixblock"),
    ("--device", "tpu", "choose auto, cpu or cuda"),
    ("--augment", "heavy", "--augment heavy"),
])
def test_bad_options_are_refused(npz_file, tmp_path, option, value, message):
    r = cli("train-cnn", "--data", npz_file, "--out", tmp_path / "run", option, value, ok=False)
    assert r.exit_code == 2 and message in r.output


def test_cuda_asked_for_but_absent_is_refused(npz_file, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("train-cnn", "--data", npz_file, "--out", tmp_path / "run", "--device", "cuda", ok=False)
    assert r.exit_code == 2 and "CUDA is not available" in r.output
