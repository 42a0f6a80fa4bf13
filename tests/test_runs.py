"""The run directory: planted files, locks, never overwriting, outputs, damaged, unfinished, interrupted
and changed runs, full disks."""

import csv
import dataclasses
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, macro_f1, scores
from featurepipe.models import fingerprint
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths

from conftest import cli, copy_run, make_arrays, refused, train_args

ROOT = Path(__file__).resolve().parents[1]


def fp(*args, env=None, limit_bytes=None, ignore_xfsz=True):
    """featurepipe in a fresh process, optionally with a file-size limit (a full disk, as the process sees it)."""
    def limited():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
            if ignore_xfsz:  # then a write past the limit fails with EFBIG, as on a full disk (ENOSPC)
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run([sys.executable, "-m", "featurepipe", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, preexec_fn=limited)


# ---- loading never runs code from a run folder -----------------------------------------------------------------------

class Planted:
    """Pickled, it runs code: touches `marker` when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


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
            "logreg.skops", "sha256")
    # A json without the hash (an older featurepipe's) still never loads an untrusted type.
    info = json.loads((run / "heads" / "logreg.json").read_text())
    del info["skops_sha256"]
    (run / "heads" / "logreg.json").write_text(json.dumps(info))
    refused(cli("predict", "--run", run, "--model", "logreg", hostile_run.parent / "data", ok=False),
            "logreg.skops", "safely")


def test_a_planted_joblib_without_its_skops_is_not_offered_as_a_fitted_head(hostile_run, tmp_path):
    import joblib

    run = copy_run(hostile_run, tmp_path)
    joblib.dump(Planted(tmp_path / "pwned"), run / "heads" / "rf.joblib")
    shutil.copy(run / "heads" / "logreg.json", run / "heads" / "rf.json")
    line = refused(cli("predict", "--run", run, "--model", "rf", hostile_run.parent / "data", ok=False),
                   "--model rf", "fitted head: logreg")
    assert "rf," not in line.split("fitted head:")[1] and not (tmp_path / "pwned").exists()


def test_planted_resume_state_runs_no_code(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": Planted(marker)}, run / "cnn" / "last.pt")
    refused(cli("train-cnn", *train_args(run), "--resume", ok=False),
            "last.pt", "cannot be loaded safely")
    assert not marker.exists()


# ---- one command per run at a time; never overwriting; where outputs may go ------------------------------------------

def test_second_writer_of_a_run_is_refused(hostile_run, tmp_path):
    run = copy_run(hostile_run, tmp_path)
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["train-cnn", "--data", hostile_run.parent / "data", "--out", run, "--overwrite"],
                     ["extract", "--run", run], ["fit-heads", "--run", run], ["compare", "--run", run]):
            refused(cli(*args, ok=False), str(run), "another featurepipe command")
    cli("fit-heads", "--run", run, "--heads", "logreg", "--tune", "none")  # released with its holder


def test_training_into_a_finished_run_needs_overwrite(tiny_run, npz_file):
    r = cli("train-cnn", "--data", npz_file, "--out", tiny_run, ok=False)
    assert r.exit_code == 2 and "--overwrite" in r.output


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


def test_a_lock_that_is_a_folder_is_one_line(hostile_run, tmp_path):
    run = copy_run(hostile_run, tmp_path)
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").mkdir()
    refused(cli("fit-heads", "--run", run, "--heads", "logreg", ok=False), str(run / ".lock"), "is a folder")


def test_predict_and_extract_do_not_replace_a_users_skipped_list(hostile_run, tmp_path):
    images = hostile_run.parent / "data" / "@dot"
    for args, out in ((["predict", "--run", hostile_run, images], tmp_path / "p.csv"),
                      (["extract", "--run", hostile_run, "--data", hostile_run.parent / "data"], tmp_path / "f.h5")):
        mine = out.with_name(f"{out.stem}.skipped.csv")
        mine.write_text("my list")
        refused(cli(*args, "--out", out, ok=False), str(mine), "--overwrite")
        assert mine.read_text() == "my list" and not out.exists()


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


# ---- what is written: CSV cells that spreadsheets would run ----------------------------------------------------------

FORMULA = ("=", "+", "-", "@", "\t", "\r")


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


# ---- changed, unfinished and damaged runs ----------------------------------------------------------------------------

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


# ---- interruptions and full disks: nothing passes for finished, a rerun completes ------------------------------------

KILL_ON_THIRD_BATCH = textwrap.dedent("""
    import os, signal, sys
    from featurepipe.models import Net
    embed, calls = Net.embed, []
    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as with a crash or an OOM kill
        return embed(self, *args, **kwargs)
    Net.embed = dying
    from featurepipe.cli import main
    sys.argv = ["featurepipe", *sys.argv[1:]]
    main()
""")


def _default_sigint() -> None:
    # A shell running a job in the background (CI can) makes it ignore SIGINT, and Python then installs
    # no KeyboardInterrupt handler; a terminal's Ctrl-C reaches a process that has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_killed_extract_leaves_no_complete_file_and_resumes_to_the_same_features(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    r = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_BATCH, "extract", "--run", str(run), "--batch-size", "16"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr

    # Nothing a later command would take for finished; the partial file says how far it got.
    assert not (run / "features.h5").exists()
    assert cli("fit-heads", "--run", run, ok=False).exit_code == 2
    with h5py.File(run / "features.h5.partial", "r") as h5:
        assert [int(h5[s].attrs["done"]) for s in ("train", "val", "test")] == [32, 0, 0]

    r = cli("extract", "--run", run, "--batch-size", "16")
    assert "resuming" in r.output
    assert not (run / "features.h5.partial").exists()
    with h5py.File(run / "features.h5") as resumed, h5py.File(tiny_run / "features.h5") as whole:
        assert dict(resumed.attrs) == dict(whole.attrs)
        for s in ("train", "val", "test"):
            assert "done" not in resumed[s].attrs
            np.testing.assert_array_equal(resumed[s]["features"][:], whole[s]["features"][:])
            np.testing.assert_array_equal(resumed[s]["labels"][:], whole[s]["labels"][:])
    cli("fit-heads", "--run", run, "--heads", "logreg")


def test_partial_file_of_another_checkpoint_is_not_resumed(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    with h5py.File(run / "features.h5.partial", "w") as h5:
        h5.attrs["checkpoint"] = "0123456789abcdef"
    r = cli("extract", "--run", run)
    assert "starting over" in r.output and "resuming" not in r.output
    with h5py.File(run / "features.h5") as new, h5py.File(tiny_run / "features.h5") as whole:
        np.testing.assert_allclose(new["test"]["features"][:], whole["test"]["features"][:], rtol=1e-5, atol=1e-6)


def test_damaged_partial_file_is_started_over(tiny_run, tmp_path):
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


def test_ctrl_c_exits_cleanly_and_resume_finishes(tmp_path):
    data = tmp_path / "big.npz"
    arrays = {}
    for seed, split, n in [(0, "train", 60), (1, "val", 10), (2, "test", 10)]:
        x, y = make_arrays(n, seed=seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(data, **arrays)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "featurepipe", "train-cnn", "--data", str(data), "--out", str(run), "--epochs", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not (run / "cnn" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "featurepipe: interrupted" in err and "Traceback" not in err
    assert len((run / "cnn" / "history.csv").read_text().splitlines()) < 1 + 3  # stopped before the end
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "3", "--resume")
    assert len((run / "cnn" / "history.csv").read_text().splitlines()) == 1 + 3


def test_full_disk_during_extract_is_one_line_and_a_rerun_completes(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "features.h5").unlink()
    r = fp("extract", "--run", run, "--batch-size", "16", "--device", "cpu", limit_bytes=60_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("featurepipe: error:") and "cannot write" in r.stderr
    cli("extract", "--run", run, "--batch-size", "16", "--device", "cpu")
    with h5py.File(run / "features.h5") as new, h5py.File(tiny_run / "features.h5") as whole:
        np.testing.assert_allclose(new["test"]["features"][:], whole["test"]["features"][:], rtol=1e-5, atol=1e-6)


def test_a_write_failing_mid_extract_drops_the_partial_file_and_nothing_else_does(tmp_path):
    from featurepipe.features import damaged_if_failed

    partial = tmp_path / "features.h5.partial"
    partial.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="out of memory"), damaged_if_failed(partial, lambda: None):
        raise RuntimeError("CUDA out of memory")  # not a write: the progress is kept
    assert partial.exists()
    with pytest.raises(FeaturepipeError, match="cannot write"), damaged_if_failed(partial, lambda: None):
        raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")
    assert not partial.exists()


def test_full_disk_during_training_is_one_line_and_a_rerun_completes(tmp_path, class_folders):
    run = tmp_path / "r"
    r = fp("train-cnn", "--data", class_folders, "--out", run, "--epochs", "1", limit_bytes=200_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in r.stderr.strip().splitlines()[-1]
    cli("train-cnn", "--data", class_folders, "--out", run, "--epochs", "1")  # no --overwrite needed
    assert (run / "cnn" / "metrics.json").exists()


def old_run(root, **extra):
    """A run as an early featurepipe left it: no data source, counts, monitor or model section."""
    (root / "cnn").mkdir(parents=True)
    (root / "cnn" / "model.pt").write_bytes(b"weights")
    (root / "cnn" / "metrics.json").write_text("{}")
    (root / "config.json").write_text(json.dumps({"data": {"class_names": ["a", "b"]}, "train": {"seed": 3}, **extra}))
    return run_paths(root)


def test_an_old_run_loads_with_defaults_and_is_frozen(tmp_path):
    cfg = RunConfig.load(old_run(tmp_path / "run"))
    assert (cfg.class_names, cfg.seed, cfg.data.source, cfg.data.counts, cfg.train.monitor, cfg.model) == \
        (["a", "b"], 3, None, {}, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None


def test_a_current_run_is_typed(tmp_path):
    model = {"arch": "sixblock", "num_classes": 2, "in_channels": 1, "img_size": 28, "mean": [0.5], "std": [0.2]}
    cfg = RunConfig.load(old_run(tmp_path / "run", model=model))
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.in_channels) == ("sixblock", 28, 1)
    assert cfg.sections["model"] == model  # as read, for the report's listing


def test_an_unfinished_run_is_refused(tmp_path):
    paths = old_run(tmp_path / "run")
    paths.cnn_metrics.unlink()
    with pytest.raises(FeaturepipeError, match="did not finish"):
        RunConfig.load(paths)


def test_fitted_heads_and_the_stale_checkpoint_check(tmp_path):
    paths = old_run(tmp_path / "run")
    cfg = RunConfig.load(paths)
    assert cfg.fitted_heads() == []
    paths.heads.mkdir()
    for name, checkpoint in (("svm", fingerprint(paths.checkpoint)), ("rf", "0" * 16)):
        paths.head_safe(name).write_bytes(b"")
        paths.head_info(name).write_text(json.dumps({"checkpoint": checkpoint}))
    paths.head_model("knn").write_bytes(b"")  # a pickle alone is never loaded, so it is no fitted head
    paths.head_info("knn").write_text(json.dumps({"checkpoint": fingerprint(paths.checkpoint)}))
    assert cfg.fitted_heads() == ["rf", "svm"]
    assert cfg.head_info("svm")["checkpoint"] == cfg.checkpoint
    with pytest.raises(FeaturepipeError, match="older checkpoint"):
        cfg.head_info("rf")


def test_one_macro_f1_for_every_caller():
    rng = np.random.default_rng(0)
    y, yhat = rng.integers(0, 3, 50), rng.integers(0, 2, 50)  # class 2 never predicted
    proba = np.eye(3)[yhat]
    assert scores(Predictions([str(i) for i in range(50)], y, proba, ["a", "b", "c"]))["macro_f1"] == macro_f1(y, yhat, 3)
    # Over the run's classes, a class missing from both counts as 0; over the labels seen, it does not count.
    assert macro_f1(np.array([0, 1]), np.array([0, 1]), 3) == pytest.approx(2 / 3)
    assert macro_f1(np.array([0, 1]), np.array([0, 1])) == 1.0


def test_create_json_lets_exactly_one_of_racing_writers_create_the_file(tmp_path):
    """crossval.json: the first job to arrive writes the plan, the others read it (issue 33)."""
    from concurrent.futures import ThreadPoolExecutor

    from featurepipe.files import create_json

    path = tmp_path / "plan.json"
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: create_json(path, {"writer": i}), range(32)))
    assert won.count(True) == 1
    assert json.loads(path.read_text()) == {"writer": won.index(True)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporary file left
