"""predict: new images in, the same probabilities the run's own files hold out."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurepipe.evaluate import load_predictions

from conftest import CLASSES as SHAPES, cli, make_arrays, prediction_file, refused

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module")
def test_images(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's test images as PNG files named after their ids (test/000000 → 000000.png)."""
    source = json.loads((tiny_run / "config.json").read_text())["data"]["source"]
    folder = tmp_path_factory.mktemp("new") / "images"
    folder.mkdir()
    for i, img in enumerate(np.load(source)["test_images"]):
        Image.fromarray(img, "L").save(folder / f"{i:06d}.png")
    return folder


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def assert_matches_saved(out_csv: Path, saved_csv: Path) -> None:
    got = rows(out_csv.read_text())
    saved = load_predictions(saved_csv, CLASSES)
    assert [Path(r["id"]).stem for r in got] == [i.split("/")[1] for i in saved.ids]
    proba = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in got])
    np.testing.assert_allclose(proba, saved.proba, atol=2e-4)
    assert [r["pred"] for r in got] == [CLASSES[k] for k in saved.y_pred]


@pytest.mark.parametrize("model", ["cnn", "svm", "logreg"])
def test_predict_gives_what_the_run_computed_for_the_same_images(tiny_run, test_images, tmp_path, model):
    out = tmp_path / "pred.csv"
    cli("predict", "--run", tiny_run, "--model", model, test_images, "--out", out, "--batch-size", "7")
    assert_matches_saved(out, prediction_file(tiny_run, model))


def test_predict_with_the_stack_and_a_head_on_other_features(tiny_run, test_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cli("extract", "--run", run, "--layer", "last2", "--tta", "flip")
    cli("fit-heads", "--run", run, "--heads", "knn", "--tune", "none")
    # svm, rf, logreg stay fitted on the penultimate features: predict embeds each head its own way.
    (run / "features.h5").unlink()
    cli("extract", "--run", run)
    cli("fit-heads", "--run", run, "--heads", "stack")
    assert json.loads((run / "heads" / "stack.json").read_text())["inputs"] == ["cnn", "knn", "logreg", "rf", "svm"]
    for model in ("knn", "stack"):
        out = tmp_path / f"{model}.csv"
        cli("predict", "--run", run, "--model", model, test_images, "--out", out)
        assert_matches_saved(out, prediction_file(run, model))


def test_colour_cnn_predictions_average_the_flips_it_trained_with(tmp_path, monkeypatch):
    import torch

    from featurepipe import defaults

    from featurepipe.device import autocast, choose_precision
    from featurepipe.models import load_checkpoint

    data = tmp_path / "colour"
    for seed, split, n in [(0, "train", 12), (1, "val", 4), (2, "test", 4)]:
        images, labels = make_arrays(n, 40, seed)
        for i, (img, y) in enumerate(zip(images, labels)):
            path = data / split / SHAPES[y] / f"{split}_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Colour, not grey saved as RGB: each channel its own function of the pattern.
            Image.fromarray(np.stack([img, img // 2, 255 - img], axis=2)).save(path)
    monkeypatch.setattr(defaults, "COLOUR_THOUSANDS_MIN_TRAIN", 36)  # these 36 training images stand in for thousands
    run = tmp_path / "run"
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "2", "--batch-size", "8", "--seed", "0")
    resolved = json.loads((run / "config.json").read_text())["train"]["resolved"]
    assert (resolved["augment"], resolved["tta"]) == ("rgb", "flips")
    saved = load_predictions(prediction_file(run, "cnn"), list(SHAPES))
    files = [data / i for i in saved.ids]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files])).permute(0, 3, 1, 2).contiguous()
    net, meta = load_checkpoint(run / "cnn" / "model.pt")
    net.eval()
    precision = choose_precision(torch.device("cpu"), None)
    with torch.no_grad(), autocast(torch.device("cpu"), precision.forward):
        flips = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
        mean = torch.softmax(torch.stack([net(v).float() for v in flips]).mean(0), 1).numpy()
        alone = torch.softmax(net(x).float(), 1).numpy()
    np.testing.assert_allclose(saved.proba, mean, atol=2e-3)
    assert np.abs(saved.proba - alone).max() > 1e-3
    # predict computes them the same way from the checkpoint alone.
    out = tmp_path / "pred.csv"
    cli("predict", "--run", run, "--model", "cnn", *files, "--out", out)
    got = np.array([[float(r[f"p_{c}"]) for c in SHAPES] for r in rows(out.read_text())])
    np.testing.assert_allclose(got, saved.proba, atol=2e-4)


def test_predict_writes_csv_to_stdout_for_files_and_folders(tiny_run, test_images):
    files = sorted(test_images.glob("*.png"))
    r = cli("predict", "--run", tiny_run, files[0], files[1], test_images)
    got = rows(r.stdout)
    assert list(got[0]) == ["id", "pred", "p_0", "p_1", "p_2"]
    assert len(got) == 2 + len(files) and got[0]["id"] == str(files[0])
    for row in got:
        p = [float(row[f"p_{c}"]) for c in CLASSES]
        assert sum(p) == pytest.approx(1.0, abs=1e-4) and row["pred"] == CLASSES[int(np.argmax(p))]


def test_colour_and_odd_sized_images_are_decoded_like_training(tiny_run, tmp_path):
    img = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(img)
    assert len(rows(cli("predict", "--run", tiny_run, "--model", "rf", img).stdout)) == 1


def test_unknown_model_lists_the_fitted_ones(tiny_run, test_images):
    r = cli("predict", "--run", tiny_run, "--model", "xgboost", test_images, ok=False)
    assert r.exit_code == 2 and "choose cnn or a fitted head: logreg, rf, svm" in r.output


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.png", "no such file or folder"),
    (lambda d: d, "no images in this folder"),
    (lambda d: (d / "broken.png").write_bytes(b"not a png") and d / "broken.png", "cannot read image"),
    (lambda d: np.savez(d / "x.npz", train_images=np.zeros((3, 8, 8), np.uint8)) or d / "x.npz",
     "not an .npz or CSV source"),
])
def test_bad_inputs_are_refused_in_one_line(tiny_run, tmp_path, make, message):
    r = cli("predict", "--run", tiny_run, make(tmp_path), ok=False)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if "error" in line]) == 1


def test_a_head_of_an_older_checkpoint_is_refused(tiny_run, test_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "heads" / "svm.json").read_text())
    info["checkpoint"] = "0" * 16
    (run / "heads" / "svm.json").write_text(json.dumps(info))
    r = cli("predict", "--run", run, "--model", "svm", test_images, ok=False)
    assert r.exit_code == 2 and "older checkpoint" in r.output


def test_model_name_cannot_point_outside_the_heads_folder(hostile_run, tmp_path):
    refused(cli("predict", "--run", hostile_run, "--model", "../cnn/model", tmp_path, ok=False), "--model ../cnn/model")


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


@pytest.mark.parametrize("target, words", [("heads/svm.skops", ("folder", "fit-heads")),
                                           ("heads/svm.json", ("svm", "fitted head")),  # no json: not fitted
                                           ("cnn/model.pt", ("folder", "train-cnn"))])
def test_a_folder_where_a_run_file_was_is_one_line(tiny_run, test_images, tmp_path, target, words):
    """heads/svm.skops replaced by a folder gave an IsADirectoryError traceback (issue 35, case 6)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / target).unlink()
    (run / target).mkdir()
    r = cli("predict", "--run", run, "--model", "svm", test_images, "--out", tmp_path / "p.csv", ok=False)
    refused(r, str(run / target) if "folder" in words else str(run), *words)
