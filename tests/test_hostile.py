"""Hostile and unlucky input (issue 14): planted files, escaping paths, bombs, formulas, races, full disks,
unfinished and changed runs, options out of range, tiny data. Each case fails in one line (exit 2) or works."""

import csv
import fcntl
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from featurepipe.data import scan
from featurepipe.errors import FeaturepipeError

from conftest import cli, make_arrays, write_images

ROOT = Path(__file__).resolve().parents[1]
FORMULA = ("=", "+", "-", "@", "\t", "\r")


def refused(r, *words: str) -> str:
    """The one error line of a refused command; it must name every word given."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("featurepipe: error:")]
    assert len(errors) == 1, r.output
    for w in words:
        assert str(w) in errors[0], (w, errors[0])
    return errors[0]


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    return copy


def train_args(run: Path) -> list[str]:
    """The options tiny_run (conftest) was trained with, for --resume."""
    config = json.loads((run / "config.json").read_text())
    return ["--data", config["data"]["source"], "--out", run, "--epochs", "4", "--batch-size", "16", "--monitor", "loss"]


def fp(*args, env=None, limit_bytes=None, ignore_xfsz=True):
    """featurepipe in a fresh process, optionally with a file-size limit (a full disk, as the process sees it)."""
    def limited():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
            if ignore_xfsz:  # then a write past the limit fails with EFBIG, as on a full disk (ENOSPC)
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run([sys.executable, "-m", "featurepipe", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, preexec_fn=limited)


class Planted:
    """Pickled, it runs code: touches `marker` when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


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


# ---- 1, 2: loading never runs code from a run folder -------------------------------------------------------------

def test_planted_head_pickle_is_never_loaded(hostile_run, tmp_path):
    run = copy_run(hostile_run, tmp_path)
    marker = tmp_path / "pwned"
    import joblib

    joblib.dump(Planted(marker), run / "heads" / "logreg.joblib")  # its json still passes every check
    cli("predict", "--run", run, "--model", "logreg", hostile_run.parent / "data")
    assert not marker.exists()


def test_planted_head_with_untrusted_types_is_refused(hostile_run, tmp_path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    run = copy_run(hostile_run, tmp_path)
    sio.dump(Pipeline([("f", FunctionTransformer(shutil.rmtree))]), run / "heads" / "logreg.skops")
    refused(cli("predict", "--run", run, "--model", "logreg", hostile_run.parent / "data", ok=False),
            "logreg.skops", "safely")


def test_model_name_cannot_point_outside_the_heads_folder(hostile_run, tmp_path):
    refused(cli("predict", "--run", hostile_run, "--model", "../cnn/model", tmp_path, ok=False), "--model ../cnn/model")


def test_planted_resume_state_runs_no_code(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": Planted(marker)}, run / "cnn" / "last.pt")
    refused(cli("train-cnn", *train_args(run), "--resume", ok=False),
            "last.pt", "cannot be loaded safely")
    assert not marker.exists()


# ---- 3, 13: CSV manifests ----------------------------------------------------------------------------------------

def _manifest(tmp_path: Path, extra: list[str], name: str = "m.csv", encoding: str = "utf-8") -> Path:
    files = write_images(tmp_path / "d" / "images", 5, size=28)
    rows = [f"{p.relative_to(tmp_path / 'd').as_posix()},{label}" for p, label in files] + extra
    path = tmp_path / "d" / name
    path.write_bytes(("path,label\n" + "\n".join(rows) + "\n").encode(encoding))
    return path


@pytest.mark.parametrize("row", ["../outside/secret.png", "/etc/passwd", "images/../../outside/secret.png"])
def test_csv_rows_outside_the_manifest_folder_are_refused(tmp_path, row):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(make_arrays(1, size=28)[0][0]).save(outside / "secret.png")
    m = _manifest(tmp_path, [f"{row},bar"])
    line = refused(cli("train-cnn", "--data", m, "--out", tmp_path / "r", ok=False), f"{m}:17", row,
                   "--allow-outside")
    assert "outside" in line
    if row != "/etc/passwd":
        r = cli("data", "inspect", "--data", m, "--allow-outside")
        assert "16 images" in r.output


def test_csv_deleted_files_are_skipped_not_a_traceback(tmp_path):
    m = _manifest(tmp_path, [])
    gone = sorted((tmp_path / "d" / "images" / "bar").iterdir())[0]
    gone.unlink()
    run = tmp_path / "r"
    cli("train-cnn", "--data", m, "--out", run, "--epochs", "1")
    assert "file not found" in (run / "skipped.csv").read_text()


def test_csv_not_utf8_is_refused(tmp_path):
    m = _manifest(tmp_path, ["images/bar/caf\u00e9.png,bar"], encoding="latin-1")
    refused(cli("data", "inspect", "--data", m, ok=False), str(m), "UTF-8")


@pytest.mark.parametrize("spelling", ["./images/{}", "images/{}", "images//{}", "images/./{}"])
def test_csv_same_file_under_two_spellings_is_refused(tmp_path, spelling):
    first = write_images(tmp_path / "d" / "images", 5, size=28)[0]
    m = _manifest(tmp_path, [f"{spelling.format(first[0].relative_to(tmp_path / 'd' / 'images').as_posix())},{first[1]}"])
    refused(cli("data", "inspect", "--data", m, ok=False), "listed more than once", "row 2")


# ---- 4: decompression bombs --------------------------------------------------------------------------------------

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A few-hundred-byte PNG whose header claims width x height pixels."""
    small = path.with_suffix(".tmp.png")
    Image.new("L", (8, 8)).save(small)
    data = bytearray(small.read_bytes())
    small.unlink()
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_skipped_before_decoding(tmp_path):
    data = tmp_path / "data"
    write_images(data, 8, size=28)
    png_claiming(data / "bar" / "bomb.png", 30000, 30000)
    r = cli("data", "inspect", "--data", data)
    assert "bomb.png" in r.output and "header claims 30000x30000 pixels" in r.output and "usable" in r.output
    run = tmp_path / "r"
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "1")
    assert "30000x30000" in (run / "skipped.csv").read_text()


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from featurepipe.data.images import UnreadableImage, read_file

    path = tmp_path / "x.png"
    Image.new("L", (40, 40)).save(path)
    monkeypatch.setenv("FEATUREPIPE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(UnreadableImage, match="40x40"):
        read_file(str(path), 28, 1)


# ---- 5, 18: formula injection, mathtext ---------------------------------------------------------------------------

def _cells(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return [cell for row in csv.reader(f) for cell in row]


def test_csv_outputs_neutralise_formulas(hostile_run, tmp_path):
    out = tmp_path / "p.csv"
    broken = hostile_run.parent / "new"
    shutil.copytree(hostile_run.parent / "data" / "=1+1", broken)
    (broken / "=cmd.png").write_bytes(b"")
    cli("predict", "--run", hostile_run, "--model", "logreg", broken, "--out", out)
    written = [out, out.with_name("p.skipped.csv"), hostile_run / "cnn" / "test_predictions.csv",
               hostile_run / "heads" / "logreg.test_predictions.csv", hostile_run / "compare" / "per_class.csv"]
    for path in written:
        cells = _cells(path)
        assert not [c for c in cells if c.startswith(FORMULA)], path
    assert any(c.startswith("'=") for c in _cells(hostile_run / "cnn" / "test_predictions.csv"))
    # and featurepipe reads its own files back unchanged
    from featurepipe.evaluate import load_predictions

    names = json.loads((hostile_run / "config.json").read_text())["data"]["class_names"]
    p = load_predictions(hostile_run / "cnn" / "test_predictions.csv", names)
    assert set(p.y_true) and any(i.startswith("=") for i in json.loads((hostile_run / "splits.json").read_text())["test"]) \
        == any(i.startswith("=") for i in p.ids)


def test_class_names_with_mathtext_are_plain_text(tmp_path):
    run = finished_run(tmp_path, {"column": "$\\undefinedcmd{x}$"})
    assert (run / "compare" / "report.html").exists()
    assert "$\\undefinedcmd{x}$" in (run / "compare" / "summary.md").read_text(encoding="utf-8")


# ---- 6: one command per run at a time ----------------------------------------------------------------------------

def test_second_writer_of_a_run_is_refused(hostile_run, tmp_path):
    run = copy_run(hostile_run, tmp_path)
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["train-cnn", "--data", hostile_run.parent / "data", "--out", run, "--overwrite"],
                     ["extract", "--run", run], ["fit-heads", "--run", run], ["compare", "--run", run]):
            refused(cli(*args, ok=False), str(run), "another featurepipe command")
    cli("fit-heads", "--run", run, "--heads", "logreg", "--tune", "none")  # released with its holder


# ---- 7, 12: never overwrite silently ------------------------------------------------------------------------------

def test_predict_does_not_overwrite(hostile_run, tmp_path):
    images = hostile_run.parent / "data" / "@dot"
    existing = tmp_path / "old.csv"
    existing.write_text("mine")
    refused(cli("predict", "--run", hostile_run, images, "--out", existing, ok=False), str(existing), "--overwrite")
    assert existing.read_text() == "mine"
    cli("predict", "--run", hostile_run, images, "--out", existing, "--overwrite")
    model = hostile_run / "cnn" / "model.pt"
    before = model.read_bytes()
    refused(cli("predict", "--run", hostile_run, images, "--out", model, "--overwrite", ok=False), "file of the run")
    assert model.read_bytes() == before


def test_extract_does_not_replace_a_run_file(hostile_run):
    target = hostile_run / "features.h5"
    before = target.stat().st_mtime_ns
    refused(cli("extract", "--run", hostile_run, "--data", hostile_run.parent / "data", "--out", target, "--overwrite",
                ok=False), "file of the run")
    assert target.stat().st_mtime_ns == before


def test_train_into_a_folder_of_other_files_is_refused(tmp_path, class_folders):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    refused(cli("train-cnn", "--data", class_folders, "--out", mine, ok=False), "holds other files", "--overwrite")
    assert (mine / "config.json").read_text() == '{"my": "settings"}'


def test_out_inside_data_is_refused(class_folders):
    refused(cli("train-cnn", "--data", class_folders, "--out", class_folders / "run", ok=False), "inside --data")
    assert not (class_folders / "run").exists()


# ---- 8: changed data --------------------------------------------------------------------------------------------

def test_changed_data_are_detected(hostile_run, tmp_path):
    run = copy_run(hostile_run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(hostile_run.parent / "data", data)
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    moved = sorted((data / "@dot").iterdir())[0]
    moved.rename(data / "=1+1" / moved.name)  # an image swapped to another class
    refused(cli("extract", "--run", run, ok=False), "changed since the run was trained")
    refused(cli("train-cnn", "--data", data, "--out", run, "--epochs", "1", "--batch-size", "16", "--resume",
                ok=False), "changed since")
    shutil.rmtree(run / "compare")
    r = cli("compare", "--run", run, "--bootstrap", "1000", "--no-gradcam")  # numbers need no pixels: a warning
    assert "changed since the run was trained" in " ".join(r.output.split())


# ---- 9: a full disk ---------------------------------------------------------------------------------------------

def test_full_disk_during_extract_is_one_line_and_a_rerun_completes(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "features.h5").unlink()
    r = fp("extract", "--run", run, "--batch-size", "16", "--device", "cpu", limit_bytes=60_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("featurepipe: error:") and "cannot write" in r.stderr
    cli("extract", "--run", run, "--batch-size", "16", "--device", "cpu")
    with h5py.File(run / "features.h5") as new, h5py.File(tiny_run / "features.h5") as whole:
        np.testing.assert_allclose(new["test"]["features"][:], whole["test"]["features"][:], rtol=1e-5, atol=1e-6)


def test_damaged_partial_file_is_started_over(tiny_run, tmp_path):
    from test_robust import KILL_ON_THIRD_BATCH

    run = copy_run(tiny_run, tmp_path)
    (run / "features.h5").unlink()
    r = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_BATCH, "extract", "--run", str(run), "--batch-size", "16",
                        "--device", "cpu"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    partial = run / "features.h5.partial"
    assert r.returncode == -signal.SIGKILL and partial.exists()
    data = bytearray(partial.read_bytes())
    data[len(data) // 3:] = bytes(len(data) - len(data) // 3)  # its index and rows overwritten, as a crash can
    partial.write_bytes(bytes(data))
    r = cli("extract", "--run", run, "--batch-size", "16", "--device", "cpu")
    assert "starting over" in " ".join(r.output.split())
    with h5py.File(run / "features.h5") as new, h5py.File(tiny_run / "features.h5") as whole:
        np.testing.assert_allclose(new["train"]["features"][:], whole["train"]["features"][:], rtol=1e-5, atol=1e-6)


def test_a_write_failing_mid_extract_drops_the_partial_file_and_nothing_else_does(tmp_path):
    from featurepipe.extract import _damaged_if_failed

    partial = tmp_path / "features.h5.partial"
    partial.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="out of memory"), _damaged_if_failed(partial, lambda: None):
        raise RuntimeError("CUDA out of memory")  # not a write: the progress is kept
    assert partial.exists()
    with pytest.raises(FeaturepipeError, match="cannot write"), _damaged_if_failed(partial, lambda: None):
        raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")
    assert not partial.exists()


def test_full_disk_during_training_is_one_line_and_a_rerun_completes(tmp_path, class_folders):
    run = tmp_path / "r"
    r = fp("train-cnn", "--data", class_folders, "--out", run, "--epochs", "1", limit_bytes=200_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in r.stderr.strip().splitlines()[-1]
    cli("train-cnn", "--data", class_folders, "--out", run, "--epochs", "1")  # no --overwrite needed
    assert (run / "cnn" / "metrics.json").exists()


# ---- 10, 11: unfinished runs and --resume ------------------------------------------------------------------------

def test_unfinished_run_is_refused_by_later_stages(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "cnn" / "metrics.json").unlink()  # as if killed before the last epoch
    for args in (["extract", "--run", run], ["fit-heads", "--run", run], ["compare", "--run", run],
                 ["predict", "--run", run, tmp_path]):
        refused(cli(*args, ok=False), "did not finish", "--resume")


def test_interrupted_overwrite_neither_passes_for_finished_nor_resumes_the_old_run(tiny_run, tmp_path, monkeypatch):
    from featurepipe.engine import Trainer

    run = copy_run(tiny_run, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert cli("train-cnn", *train_args(run), "--overwrite", ok=False).exit_code == 130
    monkeypatch.undo()
    refused(cli("extract", "--run", run, ok=False), "did not finish")
    refused(cli("train-cnn", *train_args(run), "--resume", ok=False), "last.pt does not exist")


@pytest.mark.parametrize("option, value", [("--epochs", "5"), ("--arch", "resnet18"), ("--img-size", "32"),
                                           ("--seed", "3")])
def test_resume_refuses_other_options(tiny_run, tmp_path, option, value):
    run = copy_run(tiny_run, tmp_path)
    args = train_args(run)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    refused(cli("train-cnn", *args, "--resume", ok=False), f"{option} {value} differs from the run's")


@pytest.mark.parametrize("arch", [[], ["--arch", "auto"], ["--arch", "sixblock"]])
def test_resume_takes_what_arch_auto_chose(tiny_run, tmp_path, arch):
    # tiny_run left --arch to auto, which chose sixblock for its 28-px images: auto again, or the
    # architecture it chose, is the run's own option.
    assert json.loads((tiny_run / "config.json").read_text())["train"]["resolved"]["arch"] == "sixblock"
    run = copy_run(tiny_run, tmp_path)
    assert cli("train-cnn", *train_args(run), *arch, "--resume").exit_code == 0


def test_resume_without_config_is_refused(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "config.json").unlink()
    refused(cli("train-cnn", *train_args(tiny_run)[:2], "--out", run, "--resume", ok=False), "config.json")


# ---- 14: .npz ---------------------------------------------------------------------------------------------------

def _npz(path: Path, **override) -> Path:
    arrays = {}
    for seed, split, n in [(0, "train", 8), (1, "val", 3), (2, "test", 3)]:
        x, y = make_arrays(n, seed=seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_npz_nan_pixel_does_not_blank_every_image(tmp_path):
    x = make_arrays(8)[0].astype(np.float32)
    x[0, 0, 0] = np.nan
    catalog = scan(str(_npz(tmp_path / "n.npz", train_images=x)))
    images = catalog.store.images
    assert all(images[i].std() > 0 for i in range(len(images)))


@pytest.mark.parametrize("name, value, words", [
    ("train_labels", np.array([0.7, 1.7] * 12), ["train_labels", "0.7", "whole numbers"]),
    ("train_labels", -np.ones(24, dtype=int), ["train_labels", "-1"]),
    ("train_labels", np.array(["a", "b", "c"] * 8), ["train_labels", "class indices"]),
    ("test_images", np.zeros((9, 32, 32), np.uint8), ["test_images", "same image shape"]),
    ("class_names", np.array(["a", "b"]), ["class_names", "one distinct name per label"]),
])
def test_npz_bad_arrays_are_refused(tmp_path, name, value, words):
    path = _npz(tmp_path / "b.npz", **{name: value})
    refused(cli("data", "inspect", "--data", path, ok=False), str(path), *words)


def test_npz_object_arrays_are_refused_unloaded(tmp_path):
    path = _npz(tmp_path / "o.npz", train_labels=np.array([0, 1, 2] * 7 + [None, 1, 2], dtype=object))
    refused(cli("data", "inspect", "--data", path, ok=False), str(path), "cannot read .npz")


# ---- 15, 16: options out of range, unwritable outputs, damaged run files -----------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], ["--seed -1"]),
    (["--weight-decay", "-1"], ["--weight-decay -1"]),
    (["--lr", "inf"], ["--lr inf"]),
    (["--folds", "50"], ["--folds 50", "use fewer folds"]),
])
def test_train_options_out_of_range(tmp_path, class_folders, args, words):
    refused(cli("train-cnn", "--data", class_folders, "--out", tmp_path / "r", "--epochs", "1", *args, ok=False), *words)


@pytest.mark.parametrize("steps", ["0", "1"])
def test_lr_find_needs_two_steps(tmp_path, class_folders, steps):
    refused(cli("lr-find", "--data", class_folders, "--out", tmp_path / "lr", "--steps", steps, ok=False),
            f"--steps {steps}")


def test_diverged_training_stops_in_one_line(tmp_path, class_folders):
    refused(cli("train-cnn", "--data", class_folders, "--out", tmp_path / "r", "--epochs", "2", "--lr", "1e30",
                ok=False), "diverged", "--lr")


def test_outputs_that_are_folders_or_below_files(tmp_path, class_folders, hostile_run):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    refused(cli("data", "inspect", "--data", class_folders, "--json", tmp_path, ok=False), "--json", "is a folder")
    refused(cli("train-cnn", "--data", class_folders, "--out", a_file, ok=False), "--out", "is a file")
    refused(cli("train-cnn", "--data", class_folders, "--out", a_file / "run", ok=False), "is a file, not a folder")
    refused(cli("predict", "--run", hostile_run, hostile_run.parent / "data", "--out", a_file / "p.csv", ok=False),
            "is a file, not a folder")
    refused(cli("compare", "--run", hostile_run, "--out", a_file, ok=False), "is a file")


def test_read_only_output_is_refused_before_any_work(hostile_run, tmp_path, monkeypatch):
    import featurepipe.predict as predict_mod

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not mode & os.W_OK and real(p, mode, **k))  # no write
    monkeypatch.setattr(predict_mod, "Predictor", lambda *a, **k: pytest.fail("computed before refusing"))
    refused(cli("predict", "--run", hostile_run, tmp_path, "--out", tmp_path / "p.csv", ok=False), "not writable")


def test_permission_error_while_writing_is_one_line(tiny_run, tmp_path, monkeypatch):
    import tempfile

    run = copy_run(tiny_run, tmp_path)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    refused(cli("fit-heads", "--run", run, "--heads", "logreg", "--tune", "none", ok=False), "cannot write",
            "Permission denied")


@pytest.mark.parametrize("name, content", [("splits.json", '{"train": ["x"'), ("splits.json", "[1, 2]"),
                                           ("splits.json", '{"train": 5}'),
                                           ("heads/svm.json", "{\"checkpoint\": "), ("heads/svm.json", "\xff\xfe")])
def test_damaged_run_files_are_one_line(tiny_run, tmp_path, name, content):
    run = copy_run(tiny_run, tmp_path)
    (run / name).write_text(content, encoding="latin-1")
    (run / "features.h5").unlink()
    r = cli(*(["predict", "--run", run, "--model", "svm", tmp_path] if "heads" in name else ["extract", "--run", run]),
            ok=False)
    refused(r, name)


# ---- 17: heads on small data -------------------------------------------------------------------------------------

def test_heads_fit_small_data(tmp_path):
    arrays = {}
    for seed, split, n in [(0, "train", 2), (1, "val", 2), (2, "test", 2)]:
        x, y = make_arrays(n, seed=seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(tmp_path / "small.npz", **arrays)
    run = tmp_path / "r"
    cli("train-cnn", "--data", tmp_path / "small.npz", "--out", run, "--epochs", "1")
    cli("extract", "--run", run, "--device", "cpu")
    r = cli("fit-heads", "--run", run, "--heads", "knn,svm,hgb,logreg", "--tune", "cv")
    assert (run / "heads" / "knn.json").exists() and (run / "heads" / "hgb.json").exists()
    assert json.loads((run / "heads" / "knn.json").read_text())["params"]["clf__n_neighbors"] <= 6
    r = cli("fit-heads", "--run", run, "--heads", "knn,svm,hgb", "--tune", "val")
    assert "Traceback" not in r.output


def test_svm_is_skipped_with_one_vector_of_a_class():
    from featurepipe.heads import HEADS, SkipHead, fit_chosen

    X, y = np.random.default_rng(0).normal(size=(7, 4)), np.array([0, 0, 0, 1, 1, 1, 2])
    with pytest.raises(SkipHead, match="1 training vector"):
        fit_chosen(HEADS["svm"], HEADS["svm"].defaults, X, y, 0, 1)


# ---- 19: predict and unreadable images ---------------------------------------------------------------------------

def test_predict_skips_an_empty_image_and_lists_it(hostile_run, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(hostile_run.parent / "data" / "@dot", folder)
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    r = cli("predict", "--run", hostile_run, folder, "--out", out)
    assert "empty.png" in r.output and "skipped 1" in r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 and "empty.png" in (tmp_path / "p.skipped.csv").read_text()
    refused(cli("predict", "--run", hostile_run, folder, "--on-bad-image", "error", ok=False), "empty.png")
