"""compare: the report's numbers, files, pictures, Grad-CAM and refusals, on runs with known predictions."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics

from featurepipe.evaluate import Predictions, save_predictions
from featurepipe.explain import cam_layer, gradcam, read_test_images
from featurepipe.models import create_model, load_checkpoint
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths

from conftest import assert_report_matches_sklearn, cli, fake_run, finished_run, prediction_file, read_predictions


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


def test_a_model_that_scores_lower_on_test_than_val_predicts_is_named_and_a_new_class_mix_is_not(tmp_path):
    run = fake_run(tmp_path / "run", n_classes=2, n_test=300, heads=("svm", "rf"), seed=3)
    names = ["class0", "class1"]

    def write_val(model, perfect=False):
        ids, y, proba = read_predictions(prediction_file(run, model), names)
        keep = np.concatenate([np.arange(len(y)), *[np.flatnonzero(y == 1)] * 2])  # class1 three times over
        proba = np.eye(2)[y[keep]] if perfect else proba[keep]
        val_ids = [f"val/{k:06d}" for k in range(len(keep))]
        save_predictions(run_paths(run).predictions(model, "val"), Predictions(val_ids, y[keep], proba, names))

    # Val holds the test images' own predictions in another class mix: each class recognised as often.
    for model in ("cnn", "svm", "rf"):
        write_val(model)
    cli("compare", "--run", run, "--no-gradcam")
    check = json.loads((run / "compare" / "summary.json").read_text())["val_to_test"]
    assert set(check["models"]) == {"cnn", "svm", "rf"} and check["shifted"] == []
    for c in check["models"].values():
        assert c["expected"] == pytest.approx(c["observed"]) and c["val_accuracy"] != pytest.approx(c["observed"])
    assert "No model scores significantly lower on test than val predicts" in (run / "compare" / "summary.md").read_text()

    # svm right on every val image, as a head tuned to images unlike test's can be: named, in the report and the log.
    write_val("svm", perfect=True)
    r = cli("compare", "--run", run, "--no-gradcam")
    check = json.loads((run / "compare" / "summary.json").read_text())["val_to_test"]
    assert check["shifted"] == ["svm"] and check["models"]["svm"]["expected"] > 0.99
    assert "warning: Test is unlike val: svm" in " ".join(r.output.split())
    assert "Test is unlike val: svm" in (run / "compare" / "summary.md").read_text()


def test_the_takeaway_never_says_a_cnn_above_the_baseline_is_not_above_it():
    from featurepipe.report.documents import takeaway

    # 5 of 6 test images right against a baseline of 0.5: above it, but its interval reaches down to it.
    text = takeaway({"cnn": {"accuracy": 5 / 6, "accuracy_ci": [0.5, 1.0], "macro_f1": 0.8, "macro_f1_ci": [0.4, 1.0]}}, {},
                    {"cnn_above": False, "accuracy": 0.5, "class": "a"})
    assert "not clearly above the majority-class baseline 0.5000" in text and "interval reaches down to it" in text
    assert "did not learn" not in text and "is not above" not in text


def test_a_test_split_drawn_from_val_s_own_pool_is_not_read_as_another_site(tmp_path):
    run = fake_run(tmp_path / "run", n_classes=2, n_test=300, heads=("svm",), seed=3)
    names = ["class0", "class1"]
    for model in ("cnn", "svm"):  # svm right on every val image: far above its test score
        ids, y, proba = read_predictions(prediction_file(run, model), names)
        proba = np.eye(2)[y] if model == "svm" else proba
        save_predictions(run_paths(run).predictions(model, "val"),
                         Predictions([f"val/{k:06d}" for k in range(len(y))], y, proba, names))
    config = json.loads((run / "config.json").read_text())
    config["data"]["test_given"] = False  # featurepipe drew test and val from one pool, as in every crossval fold
    (run / "config.json").write_text(json.dumps(config))
    said = " ".join(cli("compare", "--run", run, "--no-gradcam").output.split())
    assert "unlike val" not in said and "scanner" not in said
    summary = (run / "compare" / "summary.md").read_text()
    assert "Not checked: featurepipe drew this run's val and test images at random from one pool" in summary
    assert "unlike val" not in summary
    assert json.loads((run / "compare" / "summary.json").read_text())["val_to_test"]["one_pool"] is True


def test_a_cnn_that_learned_nothing_is_named_and_no_head_wins_over_it(tmp_path):
    run = fake_run(tmp_path / "failed", n_classes=2, n_test=400, heads=("logreg",), seed=2, skill={"cnn": 0.0})
    cli("compare", "--run", run, "--no-gradcam")
    summary = json.loads((run / "compare" / "summary.json").read_text())
    base = summary["baseline"]
    assert base["accuracy"] == 0.5 and base["cnn_above"] is False  # balanced test set, CNN guessing
    assert summary["tests"]["logreg"]["verdict"] == "head better than a CNN that did not learn"
    for text in ((run / "compare" / "summary.md").read_text(), (run / "compare" / "report.html").read_text()):
        assert "No evidence that the CNN learned this task" in text and "majority-class baseline" in text
        assert "Significantly better than the CNN:" not in text
    # A CNN that learned: above the baseline, and the usual verdicts.
    ok = fake_run(tmp_path / "ok", n_classes=2, n_test=400, heads=("logreg",), seed=2)
    cli("compare", "--run", ok, "--no-gradcam")
    summary = json.loads((ok / "compare" / "summary.json").read_text())
    assert summary["baseline"]["cnn_above"] is True and "did not learn" not in (ok / "compare" / "summary.md").read_text()


def test_the_best_on_macro_f1_is_named_where_it_is_not_the_best_on_accuracy(tmp_path):
    run = fake_run(tmp_path / "run", n_classes=3, n_test=300, heads=("svm",), seed=4)
    names = ["class0", "class1", "class2"]
    ids, y, _ = read_predictions(prediction_file(run, "cnn"), names)
    rng = np.random.default_rng(0)

    def write(model, pred):
        save_predictions(prediction_file(run, model), Predictions(ids, y, np.eye(3)[pred] * 0.9 + 0.1 / 3, names))

    # svm never predicts class2 (accuracy 0.667, macro F1 0.556); the CNN errs evenly (0.62 both).
    write("svm", np.where(y == 2, 0, y))
    wrong = rng.random(len(y)) >= 0.62
    write("cnn", np.where(wrong, (y + rng.integers(1, 3, len(y))) % 3, y))
    r = cli("compare", "--run", run, "--no-gradcam")
    models = json.loads((run / "compare" / "summary.json").read_text())["models"]
    assert models["svm"]["accuracy"] > models["cnn"]["accuracy"] and models["svm"]["macro_f1"] < models["cnn"]["macro_f1"]
    assert "best on test accuracy: svm" in r.output and "best on macro F1: cnn" in " ".join(r.output.split())
    md = (run / "compare" / "summary.md").read_text()
    assert "Best test accuracy: svm" in md and "Best macro F1 (every class weighed alike): cnn" in md

    # Where one model is best on both, one is named.
    write("svm", y)
    r = cli("compare", "--run", run, "--no-gradcam", "--overwrite")
    assert "best on test accuracy: svm" in r.output and "macro F1:" not in r.output
    assert "Best macro F1" not in (run / "compare" / "summary.md").read_text()


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


def test_class_names_with_mathtext_are_plain_text(tmp_path):
    run = finished_run(tmp_path, {"column": "$\\undefinedcmd{x}$"})
    assert (run / "compare" / "report.html").exists()
    assert "$\\undefinedcmd{x}$" in (run / "compare" / "summary.md").read_text(encoding="utf-8")


def test_sixblock_gradcam_equals_the_class_activation_map(tiny_run):
    # sixblock ends in global average pooling and one linear layer, so Grad-CAM of its last block is
    # exactly CAM (Zhou et al., 2016): relu(sum_k w_ck A_k) / (H W). An independent computation of it:
    paths = run_paths(tiny_run)
    ids = json.loads(paths.splits.read_text())["test"][:6]
    images = np.stack(read_test_images(RunConfig.load(paths), ids))
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    net, _ = load_checkpoint(paths.checkpoint)
    classes = [0, 1, 2, 2, 1, 0]
    cams = gradcam(net, images, classes)

    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        maps = net.features.feature_maps(net.normalize(x))[-1]
        weights = net.head[1].weight[classes]
        cam = torch.relu(torch.einsum("nk,nkhw->nhw", weights, maps))[:, None] / (maps.shape[2] * maps.shape[3])
        expected = torch.nn.functional.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(cams, expected.numpy(), rtol=1e-4, atol=1e-7)
    assert cam_layer(net) is net.features.blocks[-1]
    assert not net.features.blocks[-1]._forward_hooks
    assert all(p.grad is None for p in net.parameters())


def test_gradcam_on_a_torchvision_backbone_uses_its_last_conv():
    torch.manual_seed(0)
    net = create_model("resnet18", 3, 3, [0.5] * 3, [0.25] * 3).eval()
    layer = cam_layer(net)
    assert layer is net.features.layer4[-1].conv2
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        before = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    cams = gradcam(net, images, [0, 2])
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() > 0
    with torch.no_grad():
        after = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(before, after)
    assert not layer._forward_hooks


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


def test_compare_out_does_not_replace_a_users_files_without_overwrite(tmp_path):
    from featurepipe.report.command import RUN_FILES

    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", seed=1)
    cli("compare", "--run", a, "--no-gradcam")
    cli("compare", "--run", a, "--no-gradcam")  # RUN/compare is the run's own: no --overwrite needed
    assert set(p.name for p in (a / "compare").iterdir()) <= set(RUN_FILES)
    for runs in ([a], [a, b]):
        out = tmp_path / f"mine{len(runs)}"
        out.mkdir()
        (out / "summary.md").write_text("my notes")
        args = [arg for r in runs for arg in ("--run", r)] + ["--out", out, "--no-gradcam"]
        r = cli("compare", *args, ok=False)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert str(out / "summary.md") in r.output and "--overwrite" in r.output
        assert [p.name for p in out.iterdir()] == ["summary.md"] and (out / "summary.md").read_text() == "my notes"
        cli("compare", *args, "--overwrite")
        assert (out / "summary.md").read_text() != "my notes"


def test_figures_stay_bounded_and_say_what_is_left_out_for_many_classes(tmp_path):
    from PIL import Image

    from featurepipe import plots

    k, rng = 1000, np.random.default_rng(0)
    matrices = {m: np.diag(rng.integers(1, 5, k)) + (rng.random((k, k)) < 0.001) for m in ("cnn", "logreg", "svm")}
    calls = []
    real = plots.plt.subplots

    def recorded(*args, **kwargs):
        calls.append(kwargs["figsize"])
        fig = real(*args, **kwargs)
        calls.append(fig[0])
        return fig

    plots.plt.subplots = recorded
    try:
        plots.confusion_matrices(matrices, [f"class number {i}" for i in range(k)], tmp_path / "confusion.png")
    finally:
        plots.plt.subplots = real
    assert max(calls[0]) <= plots.MAX_INCHES
    assert "1000 classes, so no names" in calls[1]._suptitle.get_text()
    width, height = Image.open(tmp_path / "confusion.png").size
    assert max(width, height) <= plots.MAX_INCHES * 120 * 1.1


def test_a_three_image_test_split_says_what_cannot_be_computed(tmp_path):
    import warnings

    run = fake_run(tmp_path / "run", n_classes=2, n_test=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cli("compare", "--run", run, "--no-gradcam")
    text = (run / "compare" / "summary.md").read_text()
    html = re.sub(r"data:image/png;base64,[^\"]*", "", (run / "compare" / "report.html").read_text())
    assert not re.search(r"\bnan\b", text, re.IGNORECASE) and not re.search(r"\bnan\b", html, re.IGNORECASE)
    assert "DeLong's test cannot be computed: it needs 2 test images of each class" in text
