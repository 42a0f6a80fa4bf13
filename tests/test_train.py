"""train-cnn and lr-find: automatic options, schedule, fine-tuning phases, samplers, augmentation, k-fold, resume."""

from dataclasses import replace
import json
import math

import numpy as np
import pytest
import torch

from featurepipe.data import AUGMENTATIONS, ArrayStore, ImageDataset, augmentation, make_loader, resolve_augmentation
from featurepipe.data.balance import BalancedSampler
from featurepipe.engine import Trainer
from featurepipe.evaluate import load_predictions
from featurepipe.models import create_model
from featurepipe.defaults import auto_arch, auto_batch_size, auto_epochs, auto_img_size, still_learning
from featurepipe.options import TrainConfig
from featurepipe.prepare import Resolved
from featurepipe.train import _optimizer, drops_last, train

from conftest import CtrlC, cli, copy_run, refused, train_args


def _weights(run):
    return torch.load(run / "cnn" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


# ---- automatic options, schedule, architecture choice, warnings ------------------------------------------------------

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
    assert resolved["lr_backbone_ratio"] == 0.1  # grey: ImageNet's early layers move least


def test_auto_defaults():
    assert auto_img_size("sixblock", 8) == 28
    assert auto_img_size("sixblock", 28) == 28
    assert auto_img_size("sixblock", 1500) == 128
    assert auto_img_size("resnet18", 1500) == 224
    assert auto_img_size("efficientnet_lite0", 1500, pretrained=True) == 160
    assert auto_img_size("efficientnet_lite0", 100, pretrained=True) == 100
    # Lite1 and Lite2 at the sizes they were trained at, or the images' own where smaller.
    assert (auto_img_size("efficientnet_lite1", 1500, pretrained=True),
            auto_img_size("efficientnet_lite2", 1500, pretrained=True)) == (240, 260)
    assert auto_img_size("efficientnet_lite2", 224, pretrained=True) == 224


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
    # Thousands of grey images fine-tuned: every image seen at least 15 times, not ~300 steps' worth (5 epochs).
    assert auto_epochs(4800, 64, pretrained=True) == 15 and auto_epochs(2239, 64, pretrained=True) == 15
    # Thousands of colour images: ~300 steps, at least 8 epochs (dermoscopy4's 1 741 images: 11, not 15).
    assert [auto_epochs(n, 64, pretrained=True, grey=False) for n in (1741, 2239, 4800)] == [11, 9, 8]
    # A few hundred colour images keep their ~300 steps (fundus4-small's 240 in batches of 32: 38 epochs).
    assert auto_epochs(240, 32, pretrained=True, grey=False) == auto_epochs(240, 32, pretrained=True) == 38
    # No epoch silently drops a large share of the images: 178 with batch 64 used to lose 28 %.
    for n in range(17, 3000):
        batch = auto_batch_size(n)
        assert not drops_last(n, batch) or n % batch < batch / 4 and n % batch / n < 0.1


def test_still_learning_asks_whether_the_last_quarter_beat_the_rest_by_more_than_the_noise():
    falling = [1.4 - 0.05 * i for i in range(12)]  # 0.15 better over the last quarter
    assert still_learning(falling, standard_error=0.05)
    assert not still_learning(falling, standard_error=0.2)  # within the noise of this val set
    levelled = [1.4, 1.0, 0.8, 0.7, 0.65, 0.64, 0.65, 0.64, 0.63, 0.64, 0.63, 0.64]
    assert not still_learning(levelled, standard_error=0.02)
    assert not still_learning([1.0, 0.5, 0.2], standard_error=0.0)  # too short to tell


def test_a_schedule_that_ends_still_learning_runs_one_more_cycle_and_resumes_into_it(npz_file, tmp_path,
                                                                                     monkeypatch):
    import featurepipe.defaults as defaults_module

    monkeypatch.setattr(defaults_module, "auto_epochs", lambda *args: 4)
    # Still learning at the end of the planned 4 epochs, not at the end of the 2 more.
    monkeypatch.setattr(defaults_module, "still_learning", lambda losses, se: len(losses) == 4)
    cfg = dict(seed=1, augment="light")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    metrics = train(str(npz_file), whole, TrainConfig(**cfg))
    assert metrics["epochs_run"] == 6 and metrics["best_epoch"] == 6  # the final weights, as without it
    assert metrics["extensions"] == [{"start": 5, "epochs": 2, "lr_scale": 0.5}]
    lr = np.genfromtxt(whole / "cnn" / "history.csv", delimiter=",", names=True)["lr"]
    assert len(lr) == 6 and lr[4] > lr[3]  # a warm restart: the schedule's rate rises again
    assert lr[4:].max() <= 0.5 * lr[:4].max() + 1e-12

    with pytest.raises(KeyboardInterrupt):
        train(str(npz_file), broken, TrainConfig(**cfg), callbacks=[CtrlC(epoch=6)])
    train(str(npz_file), broken, TrainConfig(**cfg, resume=True))
    a, b = _weights(whole), _weights(broken)
    assert all(torch.allclose(a[k].float(), b[k].float()) for k in a)

    # Epochs given are kept as given.
    given = train(str(npz_file), tmp_path / "given", TrainConfig(**cfg, epochs=4))
    assert given["epochs_run"] == 4 and given["extensions"] == []


def test_auto_arch():
    assert auto_arch(28, 4708)[0] == "sixblock"  # MedMNIST: too small for ImageNet features
    assert auto_arch(512, 50_000)[0] == "sixblock"  # enough data to learn from scratch
    arch, weights, why = auto_arch(224, 240)
    assert (arch, weights) == ("efficientnet_lite0", "imagenet") and "240" in why


def test_auto_arch_without_the_lite0_extra_falls_back_and_says_so(monkeypatch):
    import featurepipe.defaults as defaults_module
    from featurepipe.errors import FeaturepipeError

    def missing(arch):
        raise FeaturepipeError(f"--weights imagenet for {arch} needs the extra")

    monkeypatch.setattr(defaults_module, "imagenet_weights_file", missing)
    arch, weights, why = defaults_module.auto_arch(224, 240)
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


def test_a_val_split_too_small_to_tell_says_so_instead_of_warning(tmp_path):
    from PIL import Image

    for i in range(28):  # 2 classes of 14: val is 4 images, 2 a class; even 4 right is within noise of 0.5
        path = tmp_path / "data" / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((28, 28), 40 + 160 * (i % 2), np.uint8)).save(path)
    said = " ".join(cli("train-cnn", "--data", tmp_path / "data", "--out", tmp_path / "run", "--epochs", "1").output.split())
    assert "val's 4 images are too few to tell" in said
    assert "warning" not in said and "not clearly above" not in said
    baseline = json.loads((tmp_path / "run" / "cnn" / "metrics.json").read_text())["val_baseline"]
    assert baseline["can_tell"] is False


def test_the_run_records_whether_its_test_split_is_the_source_s_own(tiny_run, class_folders, tmp_path):
    from featurepipe.data import assign_splits, scan, split_ids
    from featurepipe.options import TrainConfig
    from featurepipe.train import train

    assert json.loads((tiny_run / "config.json").read_text())["data"]["test_given"] is True  # the .npz's test split
    cli("train-cnn", "--data", class_folders, "--out", tmp_path / "drawn", "--epochs", "1")
    assert json.loads((tmp_path / "drawn" / "config.json").read_text())["data"]["test_given"] is False
    source = json.loads((tiny_run / "config.json").read_text())["data"]["source"]
    catalog = scan(source)
    fold = split_ids(catalog, assign_splits(catalog, 0))  # ids handed in, as crossval hands each fold's
    train(source, tmp_path / "fold", TrainConfig(epochs=1, batch_size=16), splits=fold)
    assert json.loads((tmp_path / "fold" / "config.json").read_text())["data"]["test_given"] is False


def test_diverged_training_stops_in_one_line(tmp_path, class_folders):
    refused(cli("train-cnn", "--data", class_folders, "--out", tmp_path / "r", "--epochs", "2", "--lr", "1e30",
                ok=False), "diverged", "--lr")


# ---- reproducibility and --resume ------------------------------------------------------------------------------------

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


def test_resume_as_the_unfinished_run_s_message_says_takes_the_run_s_own_seed_and_options(npz_file, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(str(npz_file), run, TrainConfig(epochs=2, batch_size=16, seed=3, monitor="loss", ema=True),
              callbacks=[CtrlC(epoch=2)])
    said = " ".join(cli("fit-heads", "--run", run, ok=False).output.split())
    advice = said[said.index("featurepipe train-cnn"):].split(";")[0].rstrip(".").split()[1:]
    assert "--seed" not in advice  # the command it gives names no option but --data, --out and --resume
    cli(*advice)
    train_options = json.loads((run / "config.json").read_text())["train"]
    assert (train_options["seed"], train_options["monitor"], train_options["ema"]) == (3, "loss", True)


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


# ---- which epoch is kept ---------------------------------------------------------------------------------------------

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


# ---- fine-tuning phases ----------------------------------------------------------------------------------------------

FINE_TUNING = TrainConfig(weights="x")
RESOLVED = Resolved(arch="resnet18", weights="x", arch_reason="as given", img_size=32, in_channels=3,
                    median_short_side=32, grey=False, batch_size=8, epochs=2, freeze_epochs=1, lr=1e-3,
                    lr_backbone_ratio=0.1, patience=8,
                    extend_max=0, augment="none", tta="none", intensity={}, window=[0.0, 255.0], mean=[0.5] * 3,
                    std=[0.25] * 3, data_fingerprint="")


def test_colour_sets_of_thousands_fine_tune_the_whole_backbone_at_the_heads_rate():
    from featurepipe.defaults import auto_lr_backbone_ratio

    # Colour sets of thousands (dermoscopy4's 1 741) move the whole backbone; grey sets and a few hundred
    # colour images (fundus4-small's 240) keep their early layers close to ImageNet's.
    assert auto_lr_backbone_ratio(grey=False, n_train=1741) == 1.0
    assert auto_lr_backbone_ratio(grey=False, n_train=240) == auto_lr_backbone_ratio(grey=True, n_train=4708) == 0.1
    net = create_model("resnet18", 3, 3, [0.5] * 3, [0.25] * 3)
    optimizer, _ = _optimizer(net, FINE_TUNING, replace(RESOLVED, lr_backbone_ratio=1.0), "all", steps_per_epoch=2)
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([1e-3] * len(optimizer.param_groups))


def test_frozen_phase_trains_only_the_head():
    torch.manual_seed(0)
    net = create_model("resnet18", 3, 3, [0.5] * 3, [0.25] * 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer, scheduler = _optimizer(net, FINE_TUNING, RESOLVED, "head", steps_per_epoch=2)
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
    optimizer, _ = _optimizer(net, FINE_TUNING, RESOLVED, "all", steps_per_epoch=2)
    lrs = [g["max_lr"] for g in optimizer.param_groups]
    head, backbone = lrs[0], lrs[1:]
    assert head == pytest.approx(1e-3)
    assert backbone == sorted(backbone) and backbone[0] == pytest.approx(1e-4) and backbone[-1] < head
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    assert all(p.requires_grad for p in net.parameters())


# ---- samplers and augmentation ---------------------------------------------------------------------------------------

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


def test_colour_sets_of_thousands_average_the_mirrors_training_made():
    from featurepipe.defaults import auto_tta

    # Colour images train with both mirrors, so the CNN's predictions on dermoscopy4's 1 741 average all four;
    # fundus4-small's 240 predict from the image alone, and so do X-rays, which have a side.
    assert auto_tta("rgb", grey=False, n_train=1741) == "flips"
    assert auto_tta("rgb", grey=False, n_train=240) == auto_tta("xray", grey=True, n_train=4708) == "none"
    assert {auto_tta(p, grey=False, n_train=1741) for p in ("xray", "light", "none")} == {"none"}


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


# ---- k-fold, lr-find, backbones --------------------------------------------------------------------------------------

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
    # That model trained on most of val's images: the heads choose on train by CV, stack has nothing held out
    # to combine, and compare does not read a val-to-test drop into the heads' (unheld-out) val figures.
    fitted = cli("fit-heads", "--run", run, "--heads", "logreg,stack").output
    assert "--tune cv" in fitted and "stack: skipped" in fitted
    assert json.loads((run / "heads" / "logreg.json").read_text())["tuned_on"] == "cv"
    cli("compare", "--run", run, "--no-gradcam")
    shift = json.loads((run / "compare" / "summary.json").read_text())["val_to_test"]
    assert "logreg" not in shift["models"] and shift["not_held_out"] == ["logreg"]


def test_lr_find_plots_and_suggests(npz_file, tmp_path):
    cli("lr-find", "--data", npz_file, "--out", tmp_path, "--steps", "30")
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert 1e-6 <= result["suggestion"] <= 1.0
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert result["lrs"] == sorted(result["lrs"])
    assert result["precision"]["train_step"] == "fp32"  # the suite's CPU has no native bf16 (conftest)


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
