"""Issue 3's training features: fine-tuning phases, imbalance, augmentation, k-fold, lr-find, weights."""

import hashlib
import json

import numpy as np
import pytest
import torch

from featurepipe.data import AUGMENTATIONS, ArrayStore, ImageDataset, augmentation, make_loader, resolve_augmentation
from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import load_predictions
from featurepipe.models import create_model, fetch_weights
from featurepipe.engine import Trainer
from featurepipe.train import BalancedSampler, TrainConfig, _optimizer

from conftest import cli


def _cfg(**resolved):
    cfg = TrainConfig(weights="x", lr_backbone_ratio=0.1)
    cfg.resolved = {"lr": 1e-3, "epochs": 2, "freeze_epochs": 1, "weights": cfg.weights, **resolved}
    return cfg


def test_frozen_phase_trains_only_the_head():
    torch.manual_seed(0)
    net = create_model("resnet18", 3, 3, [0.5] * 3, [0.25] * 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer, scheduler = _optimizer(net, _cfg(), "head", steps_per_epoch=2)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ds = ImageDataset(ArrayStore(images, "random"), np.arange(16), np.arange(16) % 3, 32, 3)
    trainer = Trainer(net, make_loader(ds, 8), torch.nn.CrossEntropyLoss(), torch.device("cpu"), amp=False)
    trainer.optimizer, trainer.scheduler, trainer.frozen = optimizer, scheduler, True
    trainer.train_epoch()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"head.1.weight", "head.1.bias"}  # batch-norm statistics included: untouched


def test_unfrozen_pretrained_backbone_gets_discriminative_rates():
    net = create_model("resnet18", 3, 3, [0.5] * 3, [0.25] * 3)
    optimizer, _ = _optimizer(net, _cfg(), "all", steps_per_epoch=2)
    lrs = [g["max_lr"] for g in optimizer.param_groups]
    head, backbone = lrs[0], lrs[1:]
    assert head == pytest.approx(1e-3)
    assert backbone == sorted(backbone) and backbone[0] == pytest.approx(1e-4) and backbone[-1] < head
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    assert all(p.requires_grad for p in net.parameters())


def test_balanced_sampler_draws_classes_equally():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    sampler = BalancedSampler(labels, 3)
    sampler.generator.manual_seed(0)
    drawn = labels[np.array(list(sampler))]
    assert len(drawn) == 1000
    assert np.allclose(np.bincount(drawn, minlength=3) / 1000, 1 / 3, atol=0.05)


def test_balanced_sampler_under_torchrun_splits_one_balanced_epoch_between_the_ranks():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 11)
    ranks = [BalancedSampler(labels, 3, rank, world=2) for rank in (0, 1)]
    single = BalancedSampler(labels, 3)
    for s in (*ranks, single):
        s.generator.manual_seed(7)  # what train.fit does on every rank for an epoch
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 500
    together = [i for pair in zip(*shares) for i in pair]
    assert together == list(single)[:1000]  # the ranks' shares interleave into one epoch's draw
    assert np.allclose(np.bincount(labels[together], minlength=3) / 1000, 1 / 3, atol=0.05)


@pytest.mark.parametrize("preset", [p for p in AUGMENTATIONS if p != "auto"])
@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_presets_vary_each_image_of_a_batch(preset, channels):
    t = augmentation(preset)
    if preset == "none":
        assert t is None
        return
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, channels, 28, 28), dtype=torch.uint8).expand(8, -1, -1, -1)
    y = t(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    flat = y.flatten(1)
    assert not torch.allclose(flat[0], flat[1])  # copies of one image come out different
    assert resolve_augmentation("auto", grey=True) == "xray" and resolve_augmentation("auto", grey=False) == "rgb"


def test_augmentation_keeps_the_picture_recognisable():
    # A bright left half stays mostly on the left under xray (no flips), and is flipped about half
    # of the time under rgb.
    x = torch.zeros(400, 1, 28, 28, dtype=torch.uint8)
    x[..., :14] = 200
    torch.manual_seed(0)
    for preset, flipped in [("xray", (0.0, 0.02)), ("rgb", (0.35, 0.65))]:
        y = augmentation(preset)(x)
        left_brighter = y[..., :14].mean(dim=(1, 2, 3)) > y[..., 14:].mean(dim=(1, 2, 3))
        share = 1 - left_brighter.float().mean().item()
        assert flipped[0] <= share <= flipped[1], (preset, share)


def test_kfold_saves_folds_oof_and_a_fold_averaged_test_ensemble(npz_file, tmp_path):
    run = tmp_path / "run"
    cli("train-cnn", "--data", npz_file, "--out", run, "--folds", "3", "--epochs", "1")
    metrics = json.loads((run / "cnn" / "metrics.json").read_text())
    assert metrics["folds"] == 3 and len(metrics["per_fold"]) == 3
    assert set(metrics["fold_summary"]["test_accuracy"]) == {"mean", "std", "min", "max"}
    names = ["0", "1", "2"]
    oof = load_predictions(run / "cnn" / "oof_predictions.csv", names)
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(oof.ids) == sorted(splits["train"] + splits["val"])  # every pooled image exactly once
    folds = [load_predictions(run / "folds" / f"fold{k}" / "cnn" / "test_predictions.csv", names) for k in (1, 2, 3)]
    ensemble = load_predictions(run / "cnn" / "test_predictions.csv", names)
    np.testing.assert_allclose(ensemble.proba, np.mean([f.proba for f in folds], axis=0), atol=1e-5)
    assert metrics["test"]["accuracy"] == pytest.approx(float((ensemble.y_pred == ensemble.y_true).mean()))
    best = run / "folds" / f"fold{metrics['checkpoint_fold']}" / "cnn" / "model.pt"
    assert (run / "cnn" / "model.pt").read_bytes() == best.read_bytes()
    cli("extract", "--run", run)  # the chosen fold model serves as the feature extractor


def test_lr_find_plots_and_suggests(npz_file, tmp_path):
    cli("lr-find", "--data", npz_file, "--out", tmp_path, "--steps", "30")
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert 1e-6 <= result["suggestion"] <= 1.0
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert result["lrs"] == sorted(result["lrs"])


def test_backbone_trains_end_to_end_from_random_init(npz_file, tmp_path):
    run = tmp_path / "run"
    cli("train-cnn", "--data", npz_file, "--out", run, "--arch", "resnet18", "--img-size", "32", "--epochs", "1")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["in_channels"] == 3 and cfg["model"]["arch"] == "resnet18"
    assert json.loads((run / "cnn" / "metrics.json").read_text())["test"]["accuracy"] > 0


def test_pretrained_lite0_fine_tunes_with_its_own_normalisation(npz_file, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional extra featurepipe[lite0] not installed")
    run = tmp_path / "run"
    cli("train-cnn", "--data", npz_file, "--out", run, "--arch", "efficientnet_lite0", "--weights", "imagenet",
        "--img-size", "32", "--epochs", "1", "--freeze-epochs", "1")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["mean"] == pytest.approx([127 / 255] * 3)
    assert cfg["train"]["resolved"]["freeze_epochs"] == 1
    history = (run / "cnn" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 2  # one frozen epoch, then one of the whole network


def test_config_records_a_data_fingerprint(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert len(cfg["data"]["fingerprint"]) == 16 and cfg["environment"]["git_commit"] is not None


def test_fetch_weights_downloads_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    payload = tmp_path / "payload.pth"
    torch.save({"w": torch.ones(3)}, payload)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    good.write_bytes(payload.read_bytes())
    with pytest.raises(FeaturepipeError, match="not in the cache"):
        fetch_weights("resnet18", offline=True, url=good.as_uri())
    path = fetch_weights("resnet18", url=good.as_uri())  # a file:// URL stands in for the network
    assert path == tmp_path / "hub" / "checkpoints" / good.name and path.read_bytes() == payload.read_bytes()
    assert fetch_weights("resnet18", offline=True, url=good.as_uri()) == path
    path.write_bytes(b"corrupted")
    with pytest.raises(FeaturepipeError, match="checksum"):
        fetch_weights("resnet18", offline=True, url=good.as_uri())
