"""crossval: folds that test every image once, pooled predictions, resuming, the corrected t-test, the
frozen-features arm, and class names for an .npz."""

import csv
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CtrlC, cli, prediction_file, refused, write_images, write_npz
from featurepipe.crossval import CrossvalConfig, crossval
from featurepipe.errors import FeaturepipeError
from featurepipe.models import create_model
from featurepipe.options import TrainConfig
from featurepipe.stats import corrected_resampled_ttest

FOLDS = 2
HEADS = ("logreg", "svm")
FROZEN = tuple(f"{h} (pretrained, frozen)" for h in HEADS)


def options(weights: Path) -> TrainConfig:
    """Tiny and quick: sixblock from a local state dict, two epochs (one frozen), as the CLI below."""
    return TrainConfig(arch="sixblock", weights=str(weights), epochs=1, freeze_epochs=1, batch_size=16)


CV_CONFIG = CrossvalConfig(folds=FOLDS, heads=HEADS, tune="none", bootstrap=1000)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A fold's arithmetic on a CPU depends on its thread count (the order of a parallel sum): every fold
    here runs on one, as each of two fold workers pinned to two cores does (test_fold_workers_...)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cv_args(cv: dict[str, Path], out: Path) -> list:
    """The command line of the `cv` fixture's cross-validation, into `out`."""
    return ["crossval", "--data", cv["data"], "--out", out, "--folds", FOLDS, "--heads", ",".join(HEADS),
            "--tune", "none", "--bootstrap", 1000, "--arch", "sixblock", "--weights", cv["weights"], "--epochs", 1,
            "--freeze-epochs", 1, "--batch-size", 16]


@pytest.fixture(scope="module")
def cv(tmp_path_factory) -> dict[str, Path]:
    """A finished two-fold cross-validation on the tiny .npz, from "pretrained" (random, local) weights."""
    tmp = tmp_path_factory.mktemp("cv")
    data = write_npz(tmp / "tiny.npz")
    weights = tmp / "weights.pt"
    torch.manual_seed(0)
    torch.save(create_model("sixblock", 3, 1, [0.5], [0.25]).state_dict(), weights)
    made = {"data": data, "weights": weights, "out": tmp / "cv"}
    cli(*cv_args(made, made["out"]))
    return made


def copy_of(cv: dict[str, Path], tmp_path: Path) -> Path:
    """A finished cross-validation of the user's own, to damage."""
    out = tmp_path / "cv"
    shutil.copytree(cv["out"], out)
    return out


def _ids(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [row["id"] for row in csv.DictReader(f)]


def test_every_image_is_tested_exactly_once_and_pooled(cv):
    out = cv["out"]
    tested = []
    for k in range(1, FOLDS + 1):
        splits = json.loads((out / f"fold{k}" / "splits.json").read_text())
        assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
        assert not set(splits["train"]) & set(splits["val"])
        tested += splits["test"]
        assert _ids(prediction_file(out / f"fold{k}", "cnn")) == splits["test"]
    assert len(tested) == len(set(tested)) == 186  # every image of the .npz, once
    summary = json.loads((out / "compare" / "summary.json").read_text())
    assert summary["pooled"] and summary["test_size"] == 186 and summary["folds"] == FOLDS
    # The pooled accuracy is the folds' accuracies weighted by their test sizes.
    folds = summary["per_fold"]
    for model in ("cnn", *HEADS, *FROZEN):
        weighted = sum(f["models"][model]["accuracy"] * f["n_test"] for f in folds) / 186
        assert summary["models"][model]["accuracy"] == pytest.approx(weighted)
        assert summary["fold_summary"][model]["accuracy"]["mean"] == pytest.approx(
            np.mean([f["models"][model]["accuracy"] for f in folds]))
    # Holm over the heads, recomputed here: the k-th smallest p times the heads left, never below the one before.
    p = {name: t["corrected_t"]["p_value"] for name, t in summary["tests"].items()}
    holm, running = {}, 0.0
    for k, name in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - k) * p[name]))
        holm[name] = running
    for name, t in summary["tests"].items():
        assert t["decided_by"] == "corrected_t"
        assert t["corrected_t"]["differences"] == pytest.approx(
            [f["models"][name]["accuracy"] - f["models"]["cnn"]["accuracy"] for f in folds])
        assert t["corrected_t"]["p_holm"] == pytest.approx(holm[name])
        c = corrected_resampled_ttest(np.array(t["corrected_t"]["differences"]), t["corrected_t"]["n_train"],
                                      t["corrected_t"]["n_test"])
        assert t["corrected_t"]["p_value"] == pytest.approx(c.p_value)
    html = (out / "compare" / "report.html").read_text()
    assert "Per fold" in html and "corrected t-test" in html and "mean ± sd" in html


def test_each_fold_is_an_ordinary_run(cv, tmp_path):
    cli("compare", "--run", cv["out"] / "fold1", "--out", tmp_path / "again", "--bootstrap", 1000, "--no-gradcam")
    assert (tmp_path / "again" / "report.html").exists()
    cli("compare", "--run", cv["out"], "--out", tmp_path / "pooled", "--bootstrap", 1000)  # the pooled one again
    assert json.loads((tmp_path / "pooled" / "summary.json").read_text())["test_size"] == 186


def test_pooled_compare_keeps_a_users_files_and_rewrites_its_own(cv, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my notes")
    refused(cli("compare", "--run", cv["out"], "--out", mine, "--bootstrap", 1000, ok=False), "report.html",
            "--overwrite")
    assert (mine / "report.html").read_text() == "my notes"
    cli("compare", "--run", cv["out"], "--out", cv["out"] / "compare", "--bootstrap", 1000)  # its own folder


def test_frozen_arm_rows_where_the_cnn_started_from_weights(cv, tiny_run):
    summary = json.loads((cv["out"] / "compare" / "summary.json").read_text())
    for frozen in FROZEN:
        assert frozen in summary["models"] and "frozen" in summary["features"][frozen]
    assert (cv["out"] / "fold1" / "features.frozen.h5").exists()
    assert (cv["out"] / "fold1" / "heads" / "svm.frozen.json").exists()
    # predict does not compute the pretrained backbone's features: it neither takes nor offers frozen heads.
    r = cli("predict", "--run", cv["out"] / "fold1", "--model", FROZEN[0], cv["data"], ok=False)
    line = refused(r, "--model", "svm")
    assert "frozen" not in line.split("choose", 1)[1]
    # From scratch (tiny_run): no frozen features, no frozen rows.
    plain = json.loads((tiny_run / "compare" / "summary.json").read_text())
    assert not any("frozen" in name for name in plain["models"])
    assert not (tiny_run / "features.frozen.h5").exists()


def test_interrupted_crossval_resumes_to_the_same_result(cv, tmp_path):
    out = tmp_path / "cv"
    with pytest.raises(KeyboardInterrupt):
        crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG, callbacks=[CtrlC(fit=2, epoch=2)])
    assert (out / "fold1" / "compare" / "summary.json").exists()  # the finished fold is kept...
    assert not (out / "fold2" / "cnn" / "metrics.json").exists()  # ...and the one in progress is not finished
    done = (out / "fold1" / "cnn" / "model.pt").stat().st_mtime
    crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG)
    assert (out / "fold1" / "cnn" / "model.pt").stat().st_mtime == done  # not trained again
    for k in range(1, FOLDS + 1):
        for name in ("cnn/test_predictions.csv", "heads/logreg.test_predictions.csv",
                     "heads/svm.frozen.test_predictions.csv"):
            assert (out / f"fold{k}" / name).read_text() == (cv["out"] / f"fold{k}" / name).read_text(), (k, name)
    pooled = json.loads((out / "compare" / "summary.json").read_text())
    reference = json.loads((cv["out"] / "compare" / "summary.json").read_text())
    assert pooled["models"]["cnn"]["accuracy"] == reference["models"]["cnn"]["accuracy"]


MODEL_FILES = ("cnn/test_predictions.csv", "cnn/val_predictions.csv", "heads/logreg.test_predictions.csv",
               "heads/svm.test_predictions.csv", "heads/svm.frozen.test_predictions.csv")


def same_results(out: Path, reference: Path) -> None:
    """Byte-identical fold predictions, and the same pooled summary but for when, where and how long
    (timings included)."""
    for k in range(1, FOLDS + 1):
        for name in MODEL_FILES:
            assert (out / f"fold{k}" / name).read_bytes() == (reference / f"fold{k}" / name).read_bytes(), (k, name)
    mine, theirs = (json.loads((d / "compare" / "summary.json").read_text()) for d in (out, reference))
    for s in (mine, theirs):
        for key in ("created", "timing", "environment", "run"):
            s.pop(key)
        for m in s["models"].values():
            m.pop("fit_seconds"), m.pop("predict_seconds_per_image")
    assert mine == theirs


def test_folds_as_separate_jobs_in_any_order_pool_as_in_sequence(cv, tmp_path):
    """Issue 33: fold 2's job first; while another job holds fold 1, a second job for it is refused and a job
    without --fold leaves it to its holder; fold 1's job killed mid-fold and run again pools the folds."""
    from featurepipe.runs import run_lock

    out = tmp_path / "cv"
    assert crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG, only=[2]) is None
    assert (out / "fold2" / "compare" / "summary.json").exists() and not (out / "fold1").exists()
    with run_lock(out / "fold1", "--out", create=True):  # another job holds fold 1
        with pytest.raises(FeaturepipeError, match="--fold 1: another job is running it"):
            crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG, only=[1])
        assert crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG) is None
        assert not (out / "compare").exists()
    refused(cli("compare", "--run", out, "--bootstrap", 1000, ok=False), "fold1 not finished", "featurepipe crossval")
    with pytest.raises(KeyboardInterrupt):
        crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG, only=[1], callbacks=[CtrlC(epoch=2)])
    assert crossval(str(cv["data"]), out, options(cv["weights"]), CV_CONFIG, only=[1]) is not None
    same_results(out, cv["out"])


def test_fold_workers_give_the_sequential_result(cv, tmp_path):
    out = tmp_path / "cv"
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(allowed)[:FOLDS])  # a core, so a thread, for each worker
    try:
        cli(*cv_args(cv, out), "--fold-workers", FOLDS)
    finally:
        os.sched_setaffinity(0, allowed)
    same_results(out, cv["out"])


def test_fold_options_are_checked(cv, tmp_path):
    refused(cli(*cv_args(cv, tmp_path / "a"), "--fold", 3, ok=False), "--fold 3", "1..2")
    refused(cli(*cv_args(cv, tmp_path / "b"), "--fold", "x", ok=False), "--fold x")
    refused(cli(*cv_args(cv, tmp_path / "c"), "--fold-workers", 0, ok=False), "--fold-workers 0")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_ctrl_c_in_a_crossval_says_to_run_the_same_command_again(cv, tmp_path, monkeypatch):
    import featurepipe.crossval as module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "crossval", interrupted)
    r = cli("crossval", "--data", cv["data"], "--out", tmp_path / "cv", ok=False)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "run the same crossval command again" in r.output and "--resume" not in r.output


@pytest.mark.parametrize("other", ["data", "options", "test images"])
def test_a_fold_that_is_not_the_plans_fold_is_refused_by_name(cv, tmp_path, class_folders, other):
    """Issue 35, case 2: a run trained on other data (or with other options, or testing other images) where
    fold 2 was was pooled as fold 2."""
    out = copy_of(cv, tmp_path)
    fold = out / "fold2"
    if other == "data":
        shutil.rmtree(fold)  # train-cnn no longer writes into a cross-validation: trained elsewhere, moved in
        cli("train-cnn", "--data", class_folders, "--out", tmp_path / "other", "--epochs", 1, "--batch-size", 16)
        (tmp_path / "other").rename(fold)
    elif other == "options":
        config = json.loads((fold / "config.json").read_text())
        config["train"]["epochs"] = 3
        (fold / "config.json").write_text(json.dumps(config))
    else:
        splits = json.loads((fold / "splits.json").read_text())
        splits["test"], splits["train"] = splits["test"][5:] + splits["train"][:5], splits["train"][5:] + splits["test"][:5]
        (fold / "splits.json").write_text(json.dumps(splits))
    reason = {"data": "other data", "options": "other options", "test images": "other images"}[other]
    for r in (cli(*cv_args(cv, out), ok=False),
              cli("compare", "--run", out, "--out", tmp_path / "pooled", "--bootstrap", 1000, ok=False)):
        refused(r, f"{fold}: not fold 2", reason, f"delete {fold}", "featurepipe crossval --data")
    assert not (tmp_path / "pooled").exists()


def test_a_fold_that_lost_its_checkpoint_is_repaired_by_the_command_the_error_names(cv, tmp_path):
    """Issue 35, case 3: the advice was train-cnn --out CV/fold1, which gives the fold a split of its own."""
    out = copy_of(cv, tmp_path)
    (out / "fold1" / "cnn" / "model.pt").unlink()
    line = refused(cli("compare", "--run", out, "--bootstrap", 1000, ok=False), "model.pt", "featurepipe crossval")
    assert "train-cnn" not in line
    command = shlex.split(line.split("run ", 1)[1])
    assert command[:2] == ["featurepipe", "crossval"]
    cli(*command[1:])
    for name in ("cnn/test_predictions.csv", "heads/logreg.test_predictions.csv"):  # the seed's model again
        assert (out / "fold1" / name).read_text() == (cv["out"] / "fold1" / name).read_text()


def test_train_cnn_never_writes_into_a_cross_validation(cv, tmp_path):
    out = copy_of(cv, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for target in (out, out / "fold2", out / "fold2" / "sub"):
        for extra in ((), ("--overwrite",), ("--resume",)):
            r = cli("train-cnn", "--data", cv["data"], "--out", target, "--epochs", 1, *extra, ok=False)
            refused(r, f"--out {target}", f"cross-validation {out}", "featurepipe crossval --data")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", [("extract",), ("fit-heads",), ("predict", "x.png")])
def test_commands_of_one_run_given_a_cross_validation_name_its_folds(cv, command):
    r = cli(*command, "--run", cv["out"], ok=False)
    line = refused(r, f"--run {cv['out']}", "cross-validation", f"--run {cv['out'] / 'fold1'}", "compare")
    assert "train-cnn" not in line


@pytest.mark.parametrize("damage", ["test_ids", "data", "seed"])
def test_a_damaged_plan_is_refused_in_one_line(cv, tmp_path, damage):
    out = copy_of(cv, tmp_path)
    plan = json.loads((out / "crossval.json").read_text())
    plan[damage] = None
    (out / "crossval.json").write_text(json.dumps(plan))
    for r in (cli(*cv_args(cv, out), ok=False), cli("compare", "--run", out, "--bootstrap", 1000, ok=False)):
        refused(r, "crossval.json", "not the plan")


def test_crossval_refuses_other_options_in_the_same_folder(cv):
    r = cli("crossval", "--data", cv["data"], "--out", cv["out"], "--folds", 3, "--heads", ",".join(HEADS),
            "--tune", "none", "--bootstrap", 1000, ok=False)
    refused(r, "--out", "other cross-validation options")


def test_a_bad_environment_value_is_refused_before_the_plan(cv, tmp_path, monkeypatch):
    """Issue 35, case 8: crossval.json was written, then the first fold refused the value."""
    monkeypatch.setenv("FEATUREPIPE_CPU_BF16", "garbage")
    refused(cli(*cv_args(cv, tmp_path / "cv"), ok=False), "FEATUREPIPE_CPU_BF16=garbage")
    assert not (tmp_path / "cv").exists()


def test_a_plan_whose_folds_never_started_does_not_bind_a_corrected_rerun(cv, tmp_path, monkeypatch):
    import featurepipe.crossval as module
    from featurepipe.errors import FeaturepipeError

    def refuses(*args, **kwargs):  # whatever stops the first fold before it writes anything
        raise FeaturepipeError("refused")

    monkeypatch.setattr(module, "train", refuses)
    out = tmp_path / "cv"
    refused(cli(*cv_args(cv, out), ok=False), "refused")
    assert {p.name for p in out.iterdir()} - {".lock"} == {"crossval.json"}  # no fold started
    refused(cli(*cv_args(cv, out), "--folds", 3, ok=False), "refused")  # not "other options"
    assert len(json.loads((out / "crossval.json").read_text())["test_ids"]) == 3


def test_only_jobs_changed_continues_the_cross_validation(cv, tmp_path):
    out = copy_of(cv, tmp_path)
    done = (out / "fold1" / "cnn" / "model.pt").stat().st_mtime
    r = cli(*cv_args(cv, out), "--jobs", 1)
    assert "continuing" in r.output
    assert (out / "fold1" / "cnn" / "model.pt").stat().st_mtime == done


def test_data_too_small_to_cross_validate_says_so(tmp_path):
    """Issue 35, case 9: "use at most 1 folds", while --folds 1 is refused."""
    write_images(tmp_path / "one", 1)
    for folds in (2, 3):
        line = refused(cli("crossval", "--data", tmp_path / "one", "--out", tmp_path / "x", "--folds", folds, ok=False),
                       "cannot be cross-validated", "1 image(s)")
        assert "at most" not in line


@pytest.mark.parametrize("command", ["crossval", "train-cnn"])
def test_a_refused_out_leaves_no_lock_in_a_users_folder(npz_file, tmp_path, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused(cli(command, "--data", npz_file, "--out", mine, ok=False), f"--out {mine}", "notes.txt")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_crossval_refuses_folds_the_data_cannot_fill(tmp_path):
    data = write_npz(tmp_path / "tiny.npz")  # 62 images a class
    refused(cli("crossval", "--data", data, "--out", tmp_path / "x", "--folds", 1, ok=False), "--folds 1")
    refused(cli("crossval", "--data", data, "--out", tmp_path / "y", "--folds", 61, ok=False), "--folds 61",
            "62 image(s)")


def test_corrected_resampled_ttest_against_a_hand_computation():
    # d = (0.02, 0.05, -0.01, 0.04, 0.03): mean 0.026, s² = 0.00212 / 4 = 0.00053; 5 folds of 144 test and
    # 576 training images: (1/5 + 144/576) s² = 0.45 · 0.00053 = 0.0002385, se 0.0154434, t = 1.68357,
    # two-sided p with 4 degrees of freedom 0.16757 (t tables; the uncorrected t would be 2.5254).
    c = corrected_resampled_ttest(np.array([0.02, 0.05, -0.01, 0.04, 0.03]), n_train=576, n_test=144)
    assert c.mean == pytest.approx(0.026)
    assert c.se == pytest.approx(0.0154434, rel=1e-5)
    assert c.t == pytest.approx(1.68357, rel=1e-5)
    assert c.df == 4
    assert c.p_value == pytest.approx(0.16757, abs=2e-5)


def test_npz_class_names_by_option_and_by_key(tmp_path):
    data = write_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    refused(cli("train-cnn", "--data", data, "--out", tmp_path / "bad", "--class-names", "a,b", ok=False),
            "--class-names a,b", "3 classes")
    cli("train-cnn", "--data", data, "--out", run, "--epochs", 1, "--batch-size", 16,
        "--class-names", "normal,benign,malignant")
    cli("extract", "--run", run, "--device", "cpu")  # the source read again takes the same names
    assert json.loads((run / "config.json").read_text())["data"]["class_names"] == ["normal", "benign", "malignant"]
    assert (run / "cnn" / "test_predictions.csv").read_text().splitlines()[0].endswith("p_benign,p_malignant")
    arrays = dict(np.load(data))
    np.savez(tmp_path / "named.npz", **arrays, class_names=np.array(["a", "b", "c"]))
    from featurepipe.data import scan

    assert scan(str(tmp_path / "named.npz")).class_names == ["a", "b", "c"]
