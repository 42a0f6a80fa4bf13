import json
import math

import numpy as np
import pytest
import torch

from featurepipe.engine import Callback
from featurepipe.train import (TrainConfig, auto_arch, auto_batch_size, auto_epochs, auto_img_size, drops_last,
                               train)

from conftest import cli


@pytest.mark.parametrize("source", ["class_folders", "split_folders", "train_test_folders", "csv_manifest"])
def test_every_source_trains_end_to_end(request, tmp_path, source):
    data = request.getfixturevalue(source)
    run = tmp_path / "run"
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "1")
    cli("extract", "--run", run)
    cli("fit-heads", "--run", run, "--heads", "logreg")
    cli("compare", "--run", run)
    summary = json.loads((run / "compare" / "summary.json").read_text())
    assert set(summary["models"]) == {"cnn", "logreg"}
    assert summary["class_names"] == ["bar", "column", "dot"]


def test_options_adapt_to_the_data(train_test_folders, tmp_path):
    run = tmp_path / "run"
    cli("train-cnn", "--data", train_test_folders, "--out", run, "--epochs", "1")
    resolved = json.loads((run / "config.json").read_text())["train"]["resolved"]
    # 40-px grey scans stored as RGB JPEGs: native size, one channel, the X-ray preset (no flips).
    assert resolved["img_size"] == 40 and resolved["in_channels"] == 1 and resolved["augment"] == "xray"


def test_auto_defaults():
    assert auto_img_size("sixblock", 8) == 28
    assert auto_img_size("sixblock", 28) == 28
    assert auto_img_size("sixblock", 1500) == 128
    assert auto_img_size("resnet18", 1500) == 224
    assert auto_img_size("efficientnet_lite0", 1500, pretrained=True) == 160
    assert auto_img_size("efficientnet_lite0", 100, pretrained=True) == 100


def test_schedule_in_steps():
    # PneumoniaMNIST's 4 708 images keep batches of 64 and 17 epochs; huge sets are not slowed down.
    assert auto_batch_size(4708) == 64 and auto_epochs(4708, 64, pretrained=False) == 17
    assert auto_epochs(200_000, 64, pretrained=False) == 10
    # A few hundred images: smaller batches and more epochs, so they still get ~1 250 optimizer steps.
    for n in (60, 178, 240, 700):
        batch = auto_batch_size(n)
        assert 8 <= batch <= 64 and math.ceil(n / batch) >= 4
        epochs = auto_epochs(n, batch, pretrained=False)
        assert epochs * math.ceil(n / batch) >= 1_000 or epochs == 200
        tuned = auto_epochs(n, batch, pretrained=True)
        assert tuned * math.ceil(n / batch) >= 300 or tuned == 40
    # No epoch silently drops a large share of the images: 178 with batch 64 used to lose 28 %.
    for n in range(17, 3000):
        batch = auto_batch_size(n)
        assert not drops_last(n, batch) or n % batch < batch / 4 and n % batch / n < 0.1


def test_auto_arch():
    assert auto_arch(28, 4708)[0] == "sixblock"  # MedMNIST: too small for ImageNet features
    assert auto_arch(512, 50_000)[0] == "sixblock"  # enough data to learn from scratch
    arch, weights, why = auto_arch(224, 240)
    assert (arch, weights) == ("efficientnet_lite0", "imagenet") and "240" in why


def _weights(run):
    return torch.load(run / "cnn" / "model.pt", weights_only=True)["state_dict"]


def test_same_seed_same_weights_and_metrics(npz_file, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        cli("train-cnn", "--data", npz_file, "--out", run, "--epochs", "2", "--seed", "3")
    a, b = (_weights(r) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (runs[0] / "cnn" / "history.csv").read_text().split("seconds")[0] == \
        (runs[1] / "cnn" / "history.csv").read_text().split("seconds")[0]
    metrics = [json.loads((r / "cnn" / "metrics.json").read_text()) for r in runs]
    assert metrics[0]["test"] == metrics[1]["test"]
    assert metrics[0]["best_epoch"] == 2  # by default the final weights of the schedule are kept


class CtrlC(Callback):
    """Ctrl-C as the given epoch starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer) -> None:
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_after_interruption_reaches_the_same_result(npz_file, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cfg = dict(epochs=4, seed=1, augment="light")
    train(str(npz_file), whole, TrainConfig(**cfg))

    with pytest.raises(KeyboardInterrupt):
        train(str(npz_file), broken, TrainConfig(**cfg), callbacks=[CtrlC(epoch=3)])
    assert len((broken / "cnn" / "history.csv").read_text().splitlines()) == 1 + 2
    train(str(npz_file), broken, TrainConfig(**cfg, resume=True))

    a, b = _weights(whole), _weights(broken)
    assert all(torch.allclose(a[k].float(), b[k].float()) for k in a)
    ha = np.genfromtxt(whole / "cnn" / "history.csv", delimiter=",", names=True)
    hb = np.genfromtxt(broken / "cnn" / "history.csv", delimiter=",", names=True)
    np.testing.assert_allclose(ha["val_loss"], hb["val_loss"])


def test_checkpoint_is_the_latest_epoch_within_noise_of_the_best(tiny_run):
    hist = np.genfromtxt(tiny_run / "cnn" / "history.csv", delimiter=",", names=True)
    best = json.loads((tiny_run / "cnn" / "metrics.json").read_text())["best_epoch"]
    loss, se = hist["val_loss"], hist["val_loss_se"]
    running_best = np.minimum.accumulate(loss)
    kept = [e + 1 for e in range(len(loss)) if loss[e] <= running_best[e] + se[np.argmin(loss[:e + 1])]]
    assert best == kept[-1]
    assert torch.load(tiny_run / "cnn" / "model.pt", weights_only=True)["epoch"] == best


def test_one_standard_error_rule():
    from featurepipe.callbacks import choose

    state = {"best": None, "best_se": 0.0, "best_epoch": 0}
    assert choose(state, 1, 0.80, 0.02)          # first epoch: kept
    assert choose(state, 2, 0.90, 0.02)          # better: kept
    assert choose(state, 3, 0.885, 0.03)         # within 0.02 of the best: the later epoch is kept
    assert not choose(state, 4, 0.87, 0.01)      # worse than best - SE: not kept
    assert state["best"] == 0.90 and state["best_epoch"] == 3


def test_auto_arch_without_the_lite0_extra_falls_back_and_says_so(monkeypatch):
    import featurepipe.train as train_module
    from featurepipe.errors import FeaturepipeError

    def missing(arch):
        raise FeaturepipeError(f"--weights imagenet for {arch} needs the extra")

    monkeypatch.setattr(train_module, "imagenet_weights_file", missing)
    arch, weights, why = train_module.auto_arch(224, 240)
    assert (arch, weights) == ("sixblock", None) and "not installed" in why


def test_auto_arch_is_printed_and_saved_with_its_reason(tmp_path):
    from conftest import write_images

    write_images(tmp_path / "data", 8, size=64)
    r = cli("train-cnn", "--data", tmp_path / "data", "--out", tmp_path / "run", "--epochs", "1")
    assert "--arch auto: efficientnet_lite0" in r.output
    train_cfg = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert train_cfg["arch"] == "auto"  # as given; the choice is in resolved
    resolved = train_cfg["resolved"]
    assert (resolved["arch"], resolved["weights"], resolved["img_size"]) == ("efficientnet_lite0", "imagenet", 64)
    assert "training images of 64 px" in resolved["arch_reason"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["arch"] == "efficientnet_lite0"


def test_train_cnn_warns_when_the_cnn_is_not_above_the_majority_class(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(60):  # noise, labels unrelated to it: nothing to learn
        path = tmp_path / "data" / ("a" if i % 3 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    r = cli("train-cnn", "--data", tmp_path / "data", "--out", tmp_path / "run", "--epochs", "1")
    assert "not clearly above the majority-class baseline" in r.output
    baseline = json.loads((tmp_path / "run" / "cnn" / "metrics.json").read_text())["val_baseline"]
    assert baseline["class"] == "a" and baseline["cnn_clearly_above"] is False
