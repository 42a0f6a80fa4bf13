"""Tiny, learnable image data sets in every layout featurepipe reads, made on the fly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurepipe.cli import app

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


def cli(*args: str, ok: bool = True):
    """Run the featurepipe CLI in-process; assert success unless ok=False."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


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
