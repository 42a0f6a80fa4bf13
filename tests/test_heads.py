"""fit-heads on synthetic features: registry, tuning without test, kernel approximation, out-of-core, stack.

A run directory is faked (features.h5 from make_blobs, a stand-in checkpoint, the CNN's val/test
predictions), so most of these tests need no CNN training."""

import json
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, load_predictions, save_predictions
from featurepipe.heads import HEADS, HeadsConfig, fit_heads
from featurepipe.models import fingerprint

from conftest import cli, make_arrays, prediction_file

SIZES = {"train": 300, "val": 120, "test": 150}


def synthetic_run(root: Path, dim: int = 12, classes: int = 3, sizes: dict | None = None, seed: int = 0,
                  signal: float = 1.0, cnn_signal: float = 3.0) -> Path:
    """Blobs as features; the 'CNN' sees an independent noisy view of the same labels."""
    rng = np.random.default_rng(seed)
    names = [f"c{i}" for i in range(classes)]
    centers = rng.normal(0, signal, (classes, dim))
    (root / "cnn").mkdir(parents=True)
    (root / "cnn" / "model.pt").write_bytes(rng.bytes(64))
    (root / "config.json").write_text(json.dumps({"data": {"class_names": names}, "train": {"seed": 0}}))
    (root / "cnn" / "metrics.json").write_text("{}")  # a finished run
    with h5py.File(root / "features.h5", "w") as h5:
        h5.attrs.update({"class_names": json.dumps(names), "arch": "synthetic", "layer": "penultimate",
                         "tta": "none", "checkpoint": fingerprint(root / "cnn" / "model.pt"), "img_size": 28})
        for split, n in (sizes or SIZES).items():
            y = np.arange(n) % classes
            rng.shuffle(y)
            X = centers[y] + rng.normal(0, 1.0, (n, dim)) * 1.5
            ids = [f"{split}/{i:05d}" for i in range(n)]
            g = h5.create_group(split)
            g["features"], g["labels"] = X.astype(np.float32), y.astype(np.int64)
            g.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            if split != "train":
                logits = cnn_signal * np.eye(classes)[y] + rng.normal(0, 1.5, (n, classes))
                proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
                save_predictions(root / "cnn" / f"{split}_predictions.csv", Predictions(ids, y, proba, names))
    return root


def head_json(run: Path, name: str) -> dict:
    return json.loads((run / "heads" / f"{name}.json").read_text())


@pytest.fixture
def run(tmp_path):
    return synthetic_run(tmp_path / "run")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_learns_and_gives_probabilities(run, name):
    fit_heads(run, [name], HeadsConfig(tune="none", jobs=1))
    info = head_json(run, name)
    assert info["test"]["accuracy"] >= 0.8, info["test"]  # chance is 0.33
    assert info["features"] == {"arch": "synthetic", "layer": "penultimate", "tta": "none", "dim": 12}
    with h5py.File(run / "features.h5") as h5:
        X = h5["test/features"][:]
    proba = joblib.load(run / "heads" / f"{name}.joblib").predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    saved = load_predictions(prediction_file(run, name), ["c0", "c1", "c2"])
    np.testing.assert_allclose(saved.proba, proba, rtol=1e-4, atol=1e-6)
    assert prediction_file(run, name, "val").is_file()


@pytest.mark.parametrize("tune", ["val", "cv"])
def test_tuning_never_looks_at_the_test_split(run, tune):
    fit_heads(run, ["logreg", "knn"], HeadsConfig(tune=tune, jobs=1))
    first = {h: head_json(run, h) for h in ("logreg", "knn")}
    with h5py.File(run / "features.h5", "r+") as h5:  # scramble test: any use of it would move the choice
        h5["test/features"][...] = np.random.default_rng(1).normal(0, 5, h5["test/features"].shape)
        h5["test/labels"][...] = h5["test/labels"][:][::-1]
    fit_heads(run, ["logreg", "knn"], HeadsConfig(tune=tune, jobs=1))
    for h, before in first.items():
        after = head_json(run, h)
        assert after["params"] == before["params"] and after["candidates"] == before["candidates"]
        assert len(before["candidates"]) == len(HEADS[h].candidates(tune)) > 1
        assert before["params"] in [c["params"] for c in before["candidates"]]
        assert after["tuned_on"] == tune


def test_cv_tuning_does_not_use_val_either(run):
    fit_heads(run, ["knn"], HeadsConfig(tune="cv", jobs=1))
    before = head_json(run, "knn")
    with h5py.File(run / "features.h5", "r+") as h5:
        h5["val/labels"][...] = h5["val/labels"][:][::-1]
    fit_heads(run, ["knn"], HeadsConfig(tune="cv", jobs=1))
    assert head_json(run, "knn")["candidates"] == before["candidates"]


def test_val_tuning_picks_the_best_val_candidate(run):
    fit_heads(run, ["knn"], HeadsConfig(tune="val", jobs=1))
    info = head_json(run, "knn")
    best = max(info["candidates"], key=lambda c: c["macro_f1"])
    assert info["params"] == best["params"]
    assert info["val_macro_f1"] == pytest.approx(best["macro_f1"])


def test_parallel_jobs_give_the_same_head(run):
    fit_heads(run, ["svm"], HeadsConfig(tune="val", jobs=1))
    one = head_json(run, "svm")
    fit_heads(run, ["svm"], HeadsConfig(tune="val", jobs=2))
    two = head_json(run, "svm")
    assert one["params"] == two["params"] and one["test"] == two["test"]


@pytest.mark.filterwarnings("ignore:n_components > n_samples")  # 1 000 components, 300 vectors: a tiny stand-in
def test_svm_switches_to_nystroem_above_the_limit_and_says_so(run, capsys):
    fit_heads(run, ["svm"], HeadsConfig(tune="none", jobs=1, svm_exact_limit=100))
    info = head_json(run, "svm")
    assert info["approximation"]["method"] == "nystroem" and info["approximation"]["n_train"] == 300
    assert "kernel" in joblib.load(run / "heads" / "svm.joblib").named_steps
    assert "Nystroem" in capsys.readouterr().err
    assert info["test"]["accuracy"] >= 0.8
    fit_heads(run, ["svm"], HeadsConfig(tune="none", jobs=1))
    assert "approximation" not in head_json(run, "svm")


def test_linear_heads_fit_out_of_core_without_loading_the_train_matrix(tmp_path, monkeypatch):
    run = synthetic_run(tmp_path / "run", sizes={"train": 2000, "val": 200, "test": 200})
    fit_heads(run, ["logreg", "linsvm"], HeadsConfig(tune="none", jobs=1))
    in_memory = {h: head_json(run, h)["test"]["accuracy"] for h in ("logreg", "linsvm")}

    biggest = {}
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        out = original(self, key)
        biggest[self.name] = max(biggest.get(self.name, 0), len(out) if np.ndim(out) else 0)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    # 2000×12 float32 is 96 kB: a 50 kB budget makes it "larger than memory" and switches on its own.
    fit_heads(run, ["logreg", "linsvm", "svm"], HeadsConfig(tune="val", jobs=1, chunk_rows=300, memory_bytes=50_000))
    assert biggest["/train/features"] <= 300
    for h in ("logreg", "linsvm", "svm"):
        info = head_json(run, h)
        assert info["out_of_core"] and info["chunk_rows"] == 300
        assert info["test"]["accuracy"] >= in_memory.get(h, 0.85) - 0.05, (h, info["test"])


def test_heads_without_an_online_form_are_refused_out_of_core(run):
    r = cli("fit-heads", "--run", run, "--heads", "rf,logreg", "--out-of-core", ok=False)
    assert r.exit_code == 2 and "--heads rf: need the train features in memory" in r.output


def test_stack_combines_the_cnn_and_heads_and_beats_both(tmp_path):
    # Features and 'CNN' carry independent evidence about the label, so together they must do better.
    run = synthetic_run(tmp_path / "run", dim=8, classes=2, signal=0.9, cnn_signal=1.6,
                        sizes={"train": 600, "val": 600, "test": 1500})
    fit_heads(run, ["logreg", "svm", "stack"], HeadsConfig(tune="val", jobs=1))
    info = head_json(run, "stack")
    assert info["inputs"] == ["cnn", "logreg", "svm"] and info["fitted_on"] == "val"
    assert set(info["coefficients"]) == {"cnn", "logreg", "svm"}
    names = ["c0", "c1"]
    acc = {m: load_predictions(prediction_file(run, m), names) for m in ("cnn", "logreg", "svm", "stack")}
    acc = {m: float((p.y_pred == p.y_true).mean()) for m, p in acc.items()}
    assert acc["stack"] > max(acc["cnn"], acc["logreg"], acc["svm"]) + 0.02, acc
    for f in ("stack.joblib", "stack.json", "stack.test_predictions.csv", "stack.classification_report.txt"):
        assert (run / "heads" / f).is_file()


def test_stack_needs_heads_and_the_cnn_val_predictions(run):
    r = cli("fit-heads", "--run", run, "--heads", "stack", ok=False)
    assert r.exit_code == 2 and "no fitted heads" in r.output
    (run / "cnn" / "val_predictions.csv").unlink()
    r = cli("fit-heads", "--run", run, "--heads", "logreg,stack", "--tune", "none", ok=False)
    assert r.exit_code == 2 and "CNN val predictions" in r.output


def test_stack_refuses_heads_of_an_older_checkpoint(run):
    fit_heads(run, ["logreg"], HeadsConfig(tune="none", jobs=1))
    info = head_json(run, "logreg")
    info["checkpoint"] = "0" * 16
    (run / "heads" / "logreg.json").write_text(json.dumps(info))
    with pytest.raises(FeaturepipeError, match="older checkpoint"):
        fit_heads(run, ["stack"])


def test_features_of_another_class_list_are_refused(run):
    with h5py.File(run / "features.h5", "r+") as h5:
        h5.attrs["class_names"] = json.dumps(["c0", "c1", "other"])
    r = cli("fit-heads", "--run", run, "--heads", "logreg", ok=False)
    assert r.exit_code == 2 and "classes differ" in r.output


def test_features_of_another_source_are_refused(run):
    """extract --data other.npz --out x.h5, then x.h5 copied over features.h5: the same checkpoint and classes,
    and an .npz's ids (test/000000, ...) are the run's own, but not its images."""
    from conftest import refused

    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = "data/own.npz"
    (run / "config.json").write_text(json.dumps(config))
    with h5py.File(run / "features.h5", "r+") as h5:
        h5.attrs["source"] = "data/other.npz"
    refused(cli("fit-heads", "--run", run, "--heads", "logreg", ok=False), "features.h5", "data/other.npz",
            "data/own.npz", "featurepipe extract --run")
    with h5py.File(run / "features.h5", "r+") as h5:
        h5.attrs["source"] = "data/own.npz"
    cli("fit-heads", "--run", run, "--heads", "logreg")


@pytest.mark.parametrize("option,value,message", [
    ("--tune", "test", "--tune test: choose one of none, val, cv"),
    ("--heads", "svm,xgboost", "xgboost"),
    ("--chunk-rows", "0", "--chunk-rows 0"),
])
def test_bad_fit_heads_options_are_refused(run, option, value, message):
    r = cli("fit-heads", "--run", run, option, value, ok=False)
    assert r.exit_code == 2 and message in r.output


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


def test_heads_saved_before_the_package_split_still_load(tmp_path):
    # Saved then, featurepipe's two types were named featurepipe.heads.CappedPCA and featurepipe.heads._log_proba.
    import skops.io as sio

    from featurepipe.heads import STACK, load_head, registry
    from featurepipe.runs import run_paths

    X, y = np.random.default_rng(0).uniform(0.1, 1, (60, 8)), np.arange(60) % 2
    paths = run_paths(tmp_path / "run")
    paths.heads.mkdir(parents=True)
    for name, spec, old in (("hgb", HEADS["hgb"], "featurepipe.heads.CappedPCA"),
                            (STACK, registry.STACK_SPEC, "featurepipe.heads._log_proba")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(registry.CappedPCA, "__module__", "featurepipe.heads")
            for attr, value in (("__module__", "featurepipe.heads"), ("__name__", "_log_proba"),
                                ("__qualname__", "_log_proba")):
                mp.setattr(registry.log_proba, attr, value)
            sio.dump(spec.build(0, 1).fit(X, y), paths.head_safe(name))
        assert old in sio.get_untrusted_types(file=paths.head_safe(name))
        info = {"class_names": ["a", "b"], **({"inputs": ["cnn", "h1", "h2", "h3"]} if name == STACK
                                              else {"features": {"dim": 8}})}
        assert load_head(paths, name, info).predict(X).shape == (60,)


def test_a_head_file_from_another_run_is_refused(tmp_path):
    from featurepipe.files import file_sha256
    from featurepipe.heads import load_head
    from featurepipe.runs import run_paths

    ours, theirs = synthetic_run(tmp_path / "ours"), synthetic_run(tmp_path / "theirs", seed=1)
    for run in (ours, theirs):
        fit_heads(run, ["logreg"], HeadsConfig(tune="none", jobs=1))
    paths = run_paths(ours)
    assert head_json(ours, "logreg")["skops_sha256"] == file_sha256(paths.head_safe("logreg"))
    load_head(paths, "logreg", head_json(ours, "logreg"))
    (ours / "heads" / "logreg.skops").write_bytes((theirs / "heads" / "logreg.skops").read_bytes())
    with pytest.raises(FeaturepipeError, match="logreg.skops: not the file fit-heads wrote with logreg.json"):
        load_head(paths, "logreg", head_json(ours, "logreg"))


@pytest.mark.parametrize("dim, classes, words", [(20, 3, "takes 20 features"), (12, 5, "classes [0, 1, 2, 3, 4]")])
def test_a_head_of_another_width_or_class_count_is_one_line(tmp_path, dim, classes, words):
    from featurepipe.files import file_sha256
    from featurepipe.heads import load_head
    from featurepipe.runs import run_paths

    ours, theirs = synthetic_run(tmp_path / "ours"), synthetic_run(tmp_path / "theirs", dim=dim, classes=classes)
    for run in (ours, theirs):
        fit_heads(run, ["logreg"], HeadsConfig(tune="none", jobs=1))
    (ours / "heads" / "logreg.skops").write_bytes((theirs / "heads" / "logreg.skops").read_bytes())
    info = head_json(ours, "logreg")
    info["skops_sha256"] = file_sha256(ours / "heads" / "logreg.skops")  # the json forged to match
    with pytest.raises(FeaturepipeError, match="not the 12 features and 3 classes of its json") as e:
        load_head(run_paths(ours), "logreg", info)
    assert words in str(e.value)


def test_stack_on_a_tiny_val_split_is_skipped_with_a_line(tmp_path):
    run = synthetic_run(tmp_path / "run", sizes={"train": 30, "val": 3, "test": 6})
    r = cli("fit-heads", "--run", run, "--heads", "logreg,stack", "--tune", "none")
    assert "stack: skipped: a class has fewer than 2 val images" in r.output and "--tune" not in r.output
    assert (run / "heads" / "logreg.json").exists() and not (run / "heads" / "stack.json").exists()


def test_features_that_are_not_frozen_are_refused_as_the_frozen_arm(tmp_path):
    """features.h5 copied over features.frozen.h5 (issue 35, case 4): fit-heads refuses the file, and
    compare and predict refuse a frozen-labelled head fitted on such features."""
    import shutil

    import torch

    from conftest import refused, write_npz
    from featurepipe.models import create_model

    data = write_npz(tmp_path / "tiny.npz")
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(create_model("sixblock", 3, 1, [0.5], [0.25]).state_dict(), weights)
    run = tmp_path / "run"
    cli("train-cnn", "--data", data, "--out", run, "--arch", "sixblock", "--weights", weights, "--epochs", 1,
        "--freeze-epochs", 1, "--batch-size", 16)
    cli("extract", "--run", run, "--device", "cpu")
    shutil.copy(run / "features.h5", run / "features.frozen.h5")
    refused(cli("fit-heads", "--run", run, "--heads", "logreg", ok=False),
            str(run / "features.frozen.h5"), "not the frozen", "featurepipe extract --run")
    cli("extract", "--run", run, "--device", "cpu")  # what the line says
    cli("fit-heads", "--run", run, "--heads", "logreg")
    # A head fitted by an earlier version on such a copy: its record says no frozen backbone.
    record = run / "heads" / "logreg.frozen.json"
    info = json.loads(record.read_text())
    del info["features"]["frozen"]
    record.write_text(json.dumps(info))
    refused(cli("compare", "--run", run, ok=False), "logreg.frozen", "fine-tuned", "featurepipe extract")
