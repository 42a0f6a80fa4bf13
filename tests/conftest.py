"""Shared fixtures and helpers: tiny learnable image data sets in every layout featurepipe reads, the
in-process CLI and its one-line refusals, finished runs (real, tiny, hostile, made-up) to test against."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps
from sklearn import metrics
from typer.testing import CliRunner

from featurepipe.cli import app
from featurepipe.device import NATIVE_BF16_VARIABLE
from featurepipe.engine import Callback
from featurepipe.evaluate import Predictions, save_predictions
from featurepipe.models import fingerprint
from featurepipe.runs import run_paths

# The suite's comparisons and accuracy floors were set on fp32 arithmetic: automatic precision treats
# every CPU, in this process and in the commands it starts, as one without native bf16. Tests of the
# bf16 choice set the variable themselves.
os.environ[NATIVE_BF16_VARIABLE] = "0"


# ---- data sets made on the fly ---------------------------------------------------------------------------------------

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
CLASSES = ("bar", "column", "dot")


def pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey image whose class is visible: a horizontal bar, a vertical bar or a central blob."""
    img = rng.normal(60, 20, (size, size))
    c, w = size // 2 + rng.integers(-3, 4), max(2, size // 8)
    if label == 0:
        img[c - w:c + w, 2:-2] += 140
    elif label == 1:
        img[2:-2, c - w:c + w] += 140
    else:
        yy, xx = np.mgrid[:size, :size]
        img[(yy - c) ** 2 + (xx - c) ** 2 < (size // 4) ** 2] += 140
    return np.clip(img, 0, 255).astype(np.uint8)


def make_arrays(n_per_class: int, size: int = 28, seed: int = 0, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    rng.shuffle(labels)
    return np.stack([pattern(int(y), size, rng) for y in labels]), labels


def write_images(folder: Path, n_per_class: int, size: int = 40, seed: int = 0, rgb: bool = False,
                 ext: str = ".png") -> list[tuple[Path, str]]:
    images, labels = make_arrays(n_per_class, size, seed)
    out = []
    for i, (img, y) in enumerate(zip(images, labels)):
        path = folder / CLASSES[y] / f"img_{seed}_{i:03d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img, "L")
        (pil.convert("RGB") if rgb else pil).save(path)
        out.append((path, CLASSES[y]))
    return out


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    root = tmp_path / "class_folders"
    write_images(root, 10)
    return root


@pytest.fixture
def split_folders(tmp_path: Path) -> Path:
    root = tmp_path / "split_folders"
    for seed, split, n in [(0, "train", 12), (1, "val", 4), (2, "test", 5)]:
        write_images(root / split, n, seed=seed)
    return root


@pytest.fixture
def train_test_folders(tmp_path: Path) -> Path:
    root = tmp_path / "train_test"
    write_images(root / "train", 14, seed=0, rgb=True, ext=".jpg")
    write_images(root / "test", 5, seed=1, rgb=True, ext=".jpg")
    return root


@pytest.fixture
def csv_manifest(tmp_path: Path) -> Path:
    files = write_images(tmp_path / "images", 10)
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p, label in files:
            w.writerow([p.relative_to(tmp_path).as_posix(), label])
    return path


def write_npz(path: Path) -> Path:
    """A tiny MedMNIST-style .npz: 120 / 30 / 36 images of 28 px in three classes."""
    arrays = {}
    for seed, split, n in [(0, "train", 40), (1, "val", 10), (2, "test", 12)]:
        x, y = make_arrays(n, seed=seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y[:, None]
    np.savez(path, **arrays)
    return path


@pytest.fixture
def npz_file(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "tiny.npz")


def grey_pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random grey pixels spanning exactly 0..255, so 16-bit and float scans stretch back to them."""
    g = np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)
    g.flat[0], g.flat[-1] = 0, 255
    return g


# ---- the CLI, in-process, and its refusals ---------------------------------------------------------------------------

def cli(*args: str, ok: bool = True):
    """Run the featurepipe CLI in-process; assert success unless ok=False."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(r, *words: str) -> str:
    """The one error line of a refused command; it must name every word given."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("featurepipe: error:")]
    assert len(errors) == 1, r.output
    for w in words:
        assert str(w) in errors[0], (w, errors[0])
    return errors[0]


# ---- finished runs to test against -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One complete run (train-cnn → extract → fit-heads → compare) on a tiny .npz, shared by tests."""
    tmp = tmp_path_factory.mktemp("run")
    path = write_npz(tmp / "tiny.npz")
    run = tmp / "run"
    cli("train-cnn", "--data", path, "--out", run, "--epochs", "4", "--batch-size", "16", "--seed", "0",
        "--monitor", "loss")
    cli("extract", "--run", run, "--batch-size", "16", "--device", "cpu")  # tests compare with CPU arithmetic
    cli("fit-heads", "--run", run, "--heads", "svm,rf,logreg")
    cli("compare", "--run", run)
    return run


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """A short PneumoniaMNIST run through all four commands, shared by the tests marked `real`."""
    if not REAL_DATA.exists():
        pytest.skip(f"real data not found at {REAL_DATA}")
    run = tmp_path_factory.mktemp("real") / "run"
    # On the CPU wherever the tests run: their accuracy floors were set on its arithmetic.
    cli("train-cnn", "--data", REAL_DATA, "--out", run, "--epochs", "2", "--device", "cpu")
    cli("extract", "--run", run, "--device", "cpu")
    cli("fit-heads", "--run", run, "--heads", "svm,logreg")
    cli("compare", "--run", run)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    return copy


def train_args(run: Path) -> list[str]:
    """The options tiny_run (conftest) was trained with, for --resume."""
    config = json.loads((run / "config.json").read_text())
    return ["--data", config["data"]["source"], "--out", run, "--epochs", "4", "--batch-size", "16", "--monitor", "loss"]


def finished_run(tmp: Path, names: dict[str, str]) -> Path:
    """A finished run (CNN, features, a logreg head, compare) on class folders renamed as `names` says."""
    data = tmp / "data"
    write_images(data, 10, size=28)
    for old, new in names.items():
        (data / old).rename(data / new)
    for p in sorted((data / "=1+1").iterdir())[:3] if (data / "=1+1").exists() else []:
        p.rename(p.with_name("=HYPERLINK(1)" + p.name))
    run = tmp / "run"
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "1", "--batch-size", "16")
    cli("extract", "--run", run, "--device", "cpu")
    cli("fit-heads", "--run", run, "--heads", "logreg", "--tune", "none")
    cli("compare", "--run", run, "--bootstrap", "1000", "--no-gradcam")
    return run


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A finished run whose class and file names are spreadsheet formulas."""
    return finished_run(tmp_path_factory.mktemp("hostile"), {"bar": "=1+1", "column": "-plain", "dot": "@dot"})


# ---- made-up runs with known predictions, and the report recomputed with scikit-learn --------------------------------

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
            for ext in ("joblib", "skops"):  # stand-ins: compare reads only the predictions and the json
                (root / "heads" / f"{name}.{ext}").write_bytes(b"")
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


def prediction_file(run: Path, model: str, split: str = "test") -> Path:
    return run_paths(run).predictions(model, split)


class CtrlC(Callback):
    """Ctrl-C as the given epoch of the given fit (a fold of k-fold or crossval; the first by default) starts."""

    def __init__(self, epoch: int, fit: int = 1) -> None:
        self.fit, self.epoch, self.fits = fit, epoch, 0

    def on_fit_start(self, trainer) -> None:
        self.fits += 1

    def on_epoch_start(self, trainer) -> None:
        if self.fits == self.fit and trainer.epoch == self.epoch:
            raise KeyboardInterrupt


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


def messy_archive(root: Path) -> dict[str, str]:
    """train/val/test class folders with non-ASCII names, junk files, and broken images in every split.

    Returns {id: what is wrong} for the broken ones.
    """
    for seed, split, n in [(0, "train", 12), (1, "val", 4), (2, "test", 5)]:
        write_images(root / split, n, seed=seed)
    for split in ("train", "val", "test"):
        for f in sorted((root / split / "dot").glob("*.png"))[:2]:
            f.rename(f.with_name(f"pünktchen_{f.name}"))
        (root / split / "bar" / ".DS_Store").write_bytes(b"\x00junk")
        (root / split / "column" / "Thumbs.db").write_bytes(b"\x00junk")
    good = next((root / "train" / "bar").glob("*.png")).read_bytes()
    broken = {
        "train/bar/leer.png": b"",  # zero bytes, as in Kvasir-Capsule
        "train/column/abgebrochen.png": good[: len(good) // 2],  # truncated download
        "val/dot/fehlerseite.jpg": b"<html><body>404 Not Found</body></html>",  # an error page saved as an image
        "test/column/zufall.bmp": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
        "test/dot/kaputt_ü.png": good[:40] + b"\xff" * 20 + good[60:],  # header fine, pixel data broken
    }
    for rel, content in broken.items():
        (root / rel).write_bytes(content)
    return broken


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Every split above the memory cap, caches under tmp_path."""
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FEATUREPIPE_CACHE_BYTES", "1")
    return tmp_path / "cache"
