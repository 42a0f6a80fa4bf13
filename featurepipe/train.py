"""Training the end-to-end CNN, read top to bottom: data → model → loop → best checkpoint → test.

AMP, the GPU, frozen-backbone fine-tuning, balanced sampling and k-fold are options of the same
loop, not forks of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurepipe import data as fdata
from featurepipe import distributed
from featurepipe.device import (autocast, keep_freed_memory, needs_grad_scaler, release_freed_memory, resolve_device,
                                to_device)
from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.evaluate import (Predictions, clearly_above, majority_baseline, save_evaluation, save_predictions,
                                  scores)
from featurepipe.models import (
    ARCHS,
    Net,
    create_model,
    in_channels_for,
    min_img_size,
    normalisation_for,
    save_checkpoint,
)
from featurepipe.models.backbones import LITE0_INSTALL, imagenet_weights_file
from featurepipe.progress import log, progress_bar
from featurepipe.runs import (RunPaths, atomic_path, environment, is_finished, is_run, read_json, require,
                              run_paths, write_json, write_text)

MONITORS = ("none", "loss", "macro_f1")
SAMPLERS = ("shuffle", "balanced")


@dataclass
class TrainConfig:
    """Options of train-cnn. None means: chosen from the data in front of it (see `resolve`)."""

    arch: str = "auto"
    weights: str | None = None
    epochs: int | None = None
    freeze_epochs: int | None = None
    batch_size: int | None = None
    img_size: int | None = None
    lr: float | None = None
    lr_backbone_ratio: float = 0.1
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: str = "auto"
    sampler: str = "shuffle"
    monitor: str = "none"
    patience: int | None = None
    ema: bool = True
    folds: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # mixed precision: None = on CUDA only (device.autocast)
    resume: bool = False
    overwrite: bool = False
    on_bad_image: str = "skip"
    allow_outside: bool = False  # CSV rows may name files outside the CSV's folder
    resolved: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        choices = {"arch": ("auto", *ARCHS), "augment": fdata.AUGMENTATIONS, "monitor": MONITORS, "sampler": SAMPLERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FeaturepipeError(f"--{name} {getattr(self, name)}: choose one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "img_size", "patience", "folds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FeaturepipeError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.freeze_epochs is not None and self.freeze_epochs < 0:
            raise FeaturepipeError(f"--freeze-epochs {self.freeze_epochs}: must be 0 or more")
        if self.arch == "auto" and self.weights is not None:
            raise FeaturepipeError(f"--weights {self.weights}: name the architecture they belong to with --arch")
        if self.img_size is not None and self.arch != "auto" and self.img_size < min_img_size(self.arch):
            raise FeaturepipeError(f"--img-size {self.img_size}: too small; {self.arch} needs at least "
                                   f"{min_img_size(self.arch)} px")
        fdata.check_policy(self.on_bad_image)
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise FeaturepipeError(f"--lr {self.lr}: must be a positive number")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FeaturepipeError(f"--weight-decay {self.weight_decay}: must be 0 or a positive number")
        if not 0 <= self.seed < 2**32:
            raise FeaturepipeError(f"--seed {self.seed}: must be in 0..{2**32 - 1}")
        if not 0 < self.lr_backbone_ratio <= 1:
            raise FeaturepipeError(f"--lr-backbone-ratio {self.lr_backbone_ratio}: must be in (0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise FeaturepipeError(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")


# --arch auto: pretrained EfficientNet-Lite0 for images of at least this many pixels on their short
# side and at most this many training images; sixblock from scratch otherwise (see docs/design.md,
# "Defaults and the measurements behind them").
AUTO_PRETRAINED_MIN_SIDE = 64
AUTO_PRETRAINED_MAX_TRAIN = 10_000
PRETRAINED_ARCH = "efficientnet_lite0"


def auto_arch(short_side: int, n_train: int) -> tuple[str, str | None, str]:
    """(arch, weights, reason) for --arch auto, from the images' median short side and the training set's size."""
    if short_side < AUTO_PRETRAINED_MIN_SIDE:
        return "sixblock", None, (f"images of {short_side} px: too small for ImageNet features, trained from "
                                  "scratch at their own size")
    if n_train > AUTO_PRETRAINED_MAX_TRAIN:
        return "sixblock", None, (f"{n_train} training images: enough to train from scratch, at a fraction of a "
                                  "pretrained backbone's cost")
    try:
        imagenet_weights_file(PRETRAINED_ARCH)
    except FeaturepipeError:
        return "sixblock", None, (f"{PRETRAINED_ARCH}'s ImageNet weights are not installed ({LITE0_INSTALL}), so "
                                  "trained from scratch instead")
    return PRETRAINED_ARCH, "imagenet", (f"{n_train} training images of {short_side} px: few enough that ImageNet "
                                         "features help")


def auto_img_size(arch: str, short_side: int, pretrained: bool = False) -> int:
    """Native size for small images; large scans are shrunk to what the model can learn from on a CPU.
    A pretrained backbone stops at 160 px: on 2 CPU cores EfficientNet-Lite0 trains 3x faster there
    than at 224 px."""
    cap = 128 if arch == "sixblock" else 160 if pretrained else 224
    return int(min(cap, max(min_img_size(arch), short_side)))


def auto_batch_size(n_train: int) -> int:
    """64, or for small sets the power of two nearest below a sixth of them (at least 8): a few
    hundred images still give several optimizer steps an epoch."""
    return int(min(64, max(8, 2 ** math.floor(math.log2(max(1, n_train // 6))))))


def auto_epochs(n_train: int, batch_size: int, pretrained: bool) -> int:
    """Sized in optimizer steps: from scratch about 1 250 (and at least 10 epochs, and 80 000 image
    presentations within 60 epochs: PneumoniaMNIST's 4 708 images get 17 epochs, as before), at most 200
    epochs; fine-tuning a pretrained backbone about 300 (5 to 40 epochs), where the brain MRI set's
    validation loss levelled off well before that."""
    steps = math.ceil(n_train / batch_size)
    if pretrained:
        return int(min(40, max(5, math.ceil(300 / steps))))
    return int(min(200, max(10, min(60, math.ceil(80_000 / n_train)), math.ceil(1_250 / steps))))


def drops_last(n: int, batch_size: int) -> bool:
    """Drop the last partial batch only when it is small (under a quarter of a batch): a batch of one
    or two images gives BatchNorm nothing to normalise with, but a large remainder is data."""
    return n > batch_size and n % batch_size < batch_size / 4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prepared:
    """Everything a fit needs that does not depend on which images it trains on."""

    cfg: TrainConfig
    catalog: fdata.Catalog
    splits: dict[str, np.ndarray]
    meta: dict[str, Any]
    store: Any
    position: np.ndarray  # catalog index → index in `store`
    device: torch.device
    skipped: list = field(default_factory=list)  # unreadable images left out (fdata.Skipped)

    def dataset(self, idx: np.ndarray) -> fdata.ImageDataset:
        r = self.cfg.resolved
        return fdata.ImageDataset(self.store, self.position[idx], self.catalog.labels[idx], r["img_size"],
                                  r["in_channels"])

    def ids(self, idx: np.ndarray) -> list[str]:
        return [self.catalog.ids[i] for i in idx]


def prepare(data: str, cfg: TrainConfig, saved_splits: dict[str, list[str]] | None = None) -> Prepared:
    """Scan the data, decide the split, resolve automatic options and decode what fits into memory."""
    cfg.validate()
    device = distributed.setup(resolve_device(cfg.device))
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(cfg.seed)
    catalog = fdata.scan(data, cfg.allow_outside)
    splits = fdata.assign_splits(catalog, cfg.seed, saved_splits)
    cfg = resolve(cfg, catalog, splits)
    r = cfg.resolved
    # Every image is decoded once here: unreadable ones are dropped (or stop the run, --on-bad-image
    # error), and what fits stays in memory, so 2000-px scans are not decoded again every epoch.
    stores, splits, skipped = fdata.load_splits(catalog, splits, r["img_size"], r["in_channels"], cfg.on_bad_image)
    meta = {
        "arch": r["arch"], "num_classes": len(catalog.class_names), "in_channels": r["in_channels"],
        "mean": r["mean"], "std": r["std"], "window": r["window"], "img_size": r["img_size"],
        "class_names": catalog.class_names,
    }
    store, position = catalog.store, np.arange(len(catalog))
    if isinstance(stores["train"][0], fdata.DiskCache):  # every split's images, at catalog positions
        store = stores["train"][0]
    elif all(s is not catalog.store for s, _ in stores.values()):
        # One store for all splits (k-fold mixes train and val): the splits' in-memory copies, joined.
        store = fdata.ArrayStore(np.concatenate([s.images for s, _ in stores.values()]), "cached images")
        offset = 0
        for split, (s, positions) in stores.items():
            position[splits[split]] = offset + positions
            offset += len(s.images)
    return Prepared(cfg, catalog, splits, meta, store, position, device, skipped)


def resolve(cfg: TrainConfig, catalog: fdata.Catalog, splits: dict[str, np.ndarray]) -> TrainConfig:
    """Fill every automatic option from the training images and record the choice."""
    train_idx = splits["train"]
    short_side, grey = fdata.describe_images(catalog.store, train_idx, cfg.seed)
    n_train = len(train_idx) + (len(splits["val"]) if cfg.folds > 1 else 0)
    arch, weights, why = (cfg.arch, cfg.weights, "as given") if cfg.arch != "auto" else auto_arch(short_side, n_train)
    if cfg.img_size is not None and cfg.img_size < min_img_size(arch):
        raise FeaturepipeError(f"--img-size {cfg.img_size}: too small; {arch} (chosen by --arch auto: {why}) needs "
                               f"at least {min_img_size(arch)} px")
    in_channels = in_channels_for(arch, grey)
    img_size = cfg.img_size or auto_img_size(arch, short_side, weights is not None)
    # A re-run finds this sample in the disk cache, decoded by the first (data/cache.py).
    pixels = fdata.pixel_sample(fdata.cache.reuse(catalog.store, img_size, in_channels), train_idx, img_size,
                                in_channels, cfg.seed)
    intensity = fdata.intensity.measure(pixels)
    mean, std = normalisation_for(arch, weights)
    if mean is None:
        mean, std = fdata.channel_stats(pixels, intensity.window)
    batch_size = cfg.batch_size or auto_batch_size(n_train)
    epochs = cfg.epochs or auto_epochs(n_train, batch_size, weights is not None)
    resolved = {
        "arch": arch, "weights": weights, "arch_reason": why,
        "img_size": img_size, "in_channels": in_channels, "median_short_side": short_side, "grey": grey,
        "batch_size": batch_size, "epochs": epochs,
        "freeze_epochs": cfg.freeze_epochs if cfg.freeze_epochs is not None else (1 if weights else 0),
        "lr": cfg.lr or (1e-3 if weights else 2e-3),
        "patience": cfg.patience or max(8, epochs // 3),
        "augment": fdata.resolve_augmentation(cfg.augment, grey),
        "intensity": {"high": intensity.high, "levels": intensity.levels, "low_range": intensity.low_range,
                      "description": intensity.describe()},
        "window": list(intensity.window),
        "mean": mean, "std": std, "data_fingerprint": data_fingerprint(catalog),
    }
    return replace(cfg, resolved=resolved)


def data_fingerprint(catalog: fdata.Catalog, contents: bool = True) -> str:
    """A hash of ids, labels and content (arrays) or sizes (files): tells whether two runs saw the same data.
    Without `contents`, of the index alone (ids, labels, classes)."""
    h = hashlib.sha256()
    h.update("\n".join(catalog.ids).encode())
    h.update(np.asarray(catalog.labels, dtype=np.int64).tobytes())
    h.update("\n".join(catalog.class_names).encode())
    if contents and catalog.store.in_memory:
        h.update(np.ascontiguousarray(catalog.store.images).data)
    elif contents:
        for path in catalog.store.paths:
            try:
                h.update(str(Path(path).stat().st_size).encode())
            except OSError:  # gone or unreadable: load_splits skips it (or stops) and says why
                h.update(b"-")
    return h.hexdigest()[:16]


def check_same_data(config: dict[str, Any], catalog: fdata.Catalog, where: str) -> None:
    """Compare the data read again with config.json's fingerprints: other ids, labels or classes (an image
    moved to another class) are refused; files changed under the same ids and labels are a warning, and
    each image is then read (or found unreadable) as it is now. Runs without the index fingerprint
    (older ones) refuse any change."""
    data, now = config["data"], data_fingerprint(catalog)
    index = data.get("index_fingerprint")
    if (index is not None and index != data_fingerprint(catalog, contents=False)) or \
            (index is None and data.get("fingerprint") not in (None, now)):
        raise FeaturepipeError(f"{where}: {catalog.source} changed since the run was trained (its images, labels or "
                               f"classes differ from config.json's fingerprint); train a new run on it")
    if data.get("fingerprint") not in (None, now):
        log(f"warning: {where}: files of {catalog.source} changed since the run was trained (sizes or pixels); "
            "ids and labels are the same")


def train(data: str, out: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    run = run_paths(out)
    cfg = _check_run_dir(run, data, cfg)
    prep = prepare(data, cfg, read_json(run.splits) if cfg.resume and run.splits.exists() else None)
    cfg, catalog, splits = prep.cfg, prep.catalog, prep.splits
    if cfg.resume:
        check_same_data(read_json(run.config), catalog, "--resume")
    else:  # a resumed run keeps the list its first start wrote
        _start_over(run)
        fdata.save_skipped(run.skipped, prep.skipped)
    write_json(run.splits, fdata.split_ids(catalog, splits))
    write_json(run.config, {
        "command": "train-cnn",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "source": catalog.source, "kind": catalog.kind, "class_names": catalog.class_names,
            "fingerprint": cfg.resolved["data_fingerprint"],
            "index_fingerprint": data_fingerprint(catalog, contents=False),
            "counts": {s: np.bincount(catalog.labels[idx], minlength=len(catalog.class_names)).tolist()
                       for s, idx in splits.items()},
        },
        "train": asdict(cfg),
        "model": prep.meta,
        "environment": environment(),
    })
    r = cfg.resolved
    if cfg.arch == "auto":
        log(f"--arch auto: {r['arch']}" + (" (ImageNet weights)" if r["weights"] else "") + f": {r['arch_reason']}")
    if r["intensity"]["low_range"]:
        log(f"intensity: {r['intensity']['description']}")
    log(f"training {r['arch']} on {prep.device.type}: {len(splits['train'])} train / {len(splits['val'])} val "
        f"images, {r['img_size']} px, {r['in_channels']} channel(s), {r['epochs']} epochs of batches of "
        f"{r['batch_size']}, augment={r['augment']}" + (f", {cfg.folds} folds" if cfg.folds > 1 else ""))
    result = cross_validate(prep, run) if cfg.folds > 1 else single(prep, run)
    write_json(run.cnn / "metrics.json", result)
    log(f"test accuracy {result['test']['accuracy']:.4f}, macro F1 {result['test']['macro_f1']:.4f} "
        f"→ {run.checkpoint}")
    return result


def single(prep: Prepared, run: RunPaths) -> dict[str, Any]:
    """One model on train, checkpoint chosen on val, evaluated once on test."""
    splits = prep.splits
    net, fitted = fit(prep, splits["train"], splits["val"], run)
    val = evaluate(prep, net, splits["val"])
    save_predictions(run.predictions("cnn", "val"), val)
    fitted["val_baseline"] = check_learned(prep, val)
    t0 = time.perf_counter()
    test = evaluate(prep, net, splits["test"])
    predict_seconds = time.perf_counter() - t0
    return {**fitted, "predict_seconds_per_image": predict_seconds / len(test.ids),
            "test": save_evaluation(run.predictions("cnn"), run.report("cnn"), test)}


def check_learned(prep: Prepared, val: Predictions) -> dict[str, Any]:
    """The final CNN against the majority-class baseline on val, with a warning where it is not clearly above."""
    base = majority_baseline(np.bincount(prep.catalog.labels[prep.splits["train"]], minlength=len(val.class_names)), val)
    acc = float((val.y_pred == val.y_true).mean())
    learned = clearly_above(acc, base["accuracy"], len(val.y_true))
    if not learned:
        log(f"[bold red]warning[/]: the CNN's val accuracy {acc:.4f} is not clearly above the majority-class baseline "
            f"{base['accuracy']:.4f} (always '{base['class']}'): it has not learned the task. Check the images "
            "(featurepipe data inspect) and the training curves (cnn/curves.png) before trusting any comparison "
            "built on it.")
    return {"accuracy": base["accuracy"], "class": base["class"], "cnn_clearly_above": learned}


def cross_validate(prep: Prepared, run: RunPaths) -> dict[str, Any]:
    """Stratified k-fold on train+val: out-of-fold predictions, and the fold-averaged ensemble on test.

    Where the source has groups (patients), each group's images stay in one fold, as in every split
    featurepipe makes. RUN/cnn/model.pt becomes the fold model with the best validation score, so
    extract and the heads work as after a single fit; the CNN's test predictions are the ensemble's.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    cfg, splits = prep.cfg, prep.splits
    pool = np.concatenate([splits["train"], splits["val"]])
    labels = prep.catalog.labels[pool]
    fewest = int(np.bincount(labels).min())
    if fewest < cfg.folds:
        raise FeaturepipeError(f"--folds {cfg.folds}: a class has only {fewest} image(s) in train and val; "
                               "use fewer folds")
    if prep.catalog.groups is None:
        folds = StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(pool, labels)
    else:
        groups = np.asarray(prep.catalog.groups)[pool]
        if len(np.unique(groups)) < cfg.folds:
            raise FeaturepipeError(f"--folds {cfg.folds}: train and val hold only {len(np.unique(groups))} groups; "
                                   "use fewer folds")
        folds = StratifiedGroupKFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(pool, labels, groups)
    oof = np.zeros((len(pool), len(prep.catalog.class_names)))
    test_probas, per_fold = [], []
    for k, (tr, va) in enumerate(folds, start=1):
        log(f"fold {k}/{cfg.folds}")
        fold_run = run.fold(k)
        net, fitted = fit(prep, pool[tr], pool[va], fold_run)
        val, test = evaluate(prep, net, pool[va]), evaluate(prep, net, splits["test"])
        oof[va] = val.proba
        test_probas.append(test.proba)
        save_predictions(fold_run.predictions("cnn", "val"), val)
        fold_result = {"fold": k, **fitted, "val": scores(val),
                       "test": save_evaluation(fold_run.predictions("cnn"), fold_run.report("cnn"), test)}
        write_json(fold_run.cnn / "metrics.json", fold_result)
        per_fold.append(fold_result)
    best = max(per_fold, key=lambda f: f["val"]["macro_f1"] if cfg.monitor == "macro_f1" else -f["val"]["log_loss"])
    with atomic_path(run.checkpoint) as tmp:
        shutil.copyfile(run.fold(best["fold"]).checkpoint, tmp)
    oof_pred = Predictions(prep.ids(pool), prep.catalog.labels[pool], oof, prep.catalog.class_names)
    save_predictions(run.cnn / "oof_predictions.csv", oof_pred)
    in_val = np.isin(pool, splits["val"])
    save_predictions(run.predictions("cnn", "val"), Predictions(
        prep.ids(pool[in_val]), prep.catalog.labels[pool[in_val]], oof[in_val], prep.catalog.class_names))
    test = evaluate(prep, None, splits["test"], proba=np.mean(test_probas, axis=0))
    summary = {}
    for part in ("val", "test"):
        for metric in ("accuracy", "macro_f1"):
            values = [f[part][metric] for f in per_fold]
            summary[f"{part}_{metric}"] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                           "min": float(np.min(values)), "max": float(np.max(values))}
    return {
        "folds": cfg.folds, "per_fold": per_fold, "fold_summary": summary, "checkpoint_fold": best["fold"],
        "oof": scores(oof_pred), "train_seconds": sum(f["train_seconds"] for f in per_fold),
        "test": save_evaluation(run.predictions("cnn"), run.report("cnn"), test), "test_is": "fold ensemble",
    }


def fit(prep: Prepared, train_idx: np.ndarray, val_idx: np.ndarray, run: RunPaths) -> tuple[Net, dict[str, Any]]:
    """Train one model; keep the chosen epoch's weights (see `choose` and --monitor) and return them loaded."""
    cfg, r, device = prep.cfg, prep.cfg.resolved, prep.device
    n_classes = len(prep.catalog.class_names)
    pin = device.type == "cuda"
    train_ds = prep.dataset(train_idx)
    augment = fdata.augmentation(r["augment"])  # per image, on whole batches on the device
    world = distributed.world_size()
    # Each process sees its own shard of every epoch; the global batch stays --batch-size.
    sampler = None
    if cfg.sampler == "balanced":
        sampler = BalancedSampler(train_ds.labels, n_classes, distributed.rank(), world)
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, world, distributed.rank(), shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    train_loader = fdata.make_loader(train_ds, max(1, r["batch_size"] // world), shuffle=True, seed=cfg.seed,
                                     pin_memory=pin, drop_last=drops_last(len(train_ds), r["batch_size"]),
                                     sampler=sampler)
    val_loader = fdata.make_loader(prep.dataset(val_idx), 256, pin_memory=pin)
    # On a GPU, images in memory are copied there once and batches sliced there (data/gpu.py).
    train_loader, val_loader = fdata.gpu.on_device(train_loader, device), fdata.gpu.on_device(val_loader, device)

    net = create_model(r["arch"], n_classes, r["in_channels"], r["mean"], r["std"], r["weights"],
                       window=tuple(r["window"]))
    net = net.to(device, memory_format=torch.channels_last)
    model = net
    if world > 1:
        torch.manual_seed(cfg.seed + 1000 * distributed.rank())  # different augmentation on each rank
    ema = _ema(net, (r["freeze_epochs"] + r["epochs"]) * len(train_loader)) if cfg.ema else None
    # The weights that are validated and checkpointed: the moving average where there is one.
    evaluated = ema.module if ema is not None else net
    # Imbalance: class-weighted loss, unless the sampler already balances the batches.
    class_weights = np.ones(n_classes) if sampler else balanced_class_weights(train_ds.labels, n_classes)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32, device=device),
                                    label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))
    total = r["freeze_epochs"] + r["epochs"]
    state = {"epoch": 0, "best": None, "best_se": 0.0, "best_epoch": 0, "history": []}
    optimizer = scheduler = phase = None
    if cfg.resume and run.last_checkpoint.exists():
        ckpt = _load_resume_state(run.last_checkpoint)
        net.load_state_dict(ckpt["train_state_dict"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        state = ckpt["state"]
        phase = _phase(state["epoch"], r["freeze_epochs"])
        optimizer, scheduler = _optimizer(net, cfg, phase, len(train_loader))
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(net)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng(ckpt["rng"])
        log(f"resuming {run.root} after epoch {state['epoch']}")

    started = time.perf_counter() - state.get("seconds", 0.0)
    for epoch in range(state["epoch"] + 1, total + 1):
        if _phase(epoch, r["freeze_epochs"]) != phase:
            # Phase 1 trains the new head on a frozen backbone, phase 2 everything (fastai's fine_tune).
            phase = _phase(epoch, r["freeze_epochs"])
            optimizer, scheduler = _optimizer(net, cfg, phase, len(train_loader))
            if world > 1:
                # DDP averages gradients across processes; it is rebuilt per phase because it only
                # syncs the parameters that train. The plain module is what is evaluated and saved.
                model = torch.nn.parallel.DistributedDataParallel(net)
        # Seeded per epoch, so a resumed run shuffles exactly as an uninterrupted one would.
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            (sampler.generator if sampler else train_loader.generator).manual_seed(cfg.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task(f"epoch {epoch}/{total}" + (" (head only)" if phase == "head" else ""),
                                total=_images_per_epoch(train_loader), info="")
            train_loss, train_acc = _train_epoch(model, train_loader, criterion, optimizer, scheduler, scaler,
                                                 device, cfg.amp, phase == "head", bar, task, ema, augment)
            train_seconds = time.perf_counter() - t0
            val = predict(evaluated, val_loader, device, cfg.amp, ids=None, class_names=prep.catalog.class_names)
            if not np.isfinite(val.proba).all():
                raise _diverged("the validation predictions", float("nan"), r["lr"])
            val_loss, val_loss_se = _val_loss(val, class_weights)
            row = {
                "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_accuracy": float((val.y_pred == val.y_true).mean()), "val_macro_f1": _macro_f1(val),
                "lr": optimizer.param_groups[-1]["lr"], "seconds": round(time.perf_counter() - t0, 2),
                "train_images_per_second": round(_images_per_epoch(train_loader) / train_seconds, 1),
            }
            if cfg.monitor != "none":
                row[f"val_{cfg.monitor}_se"] = val_loss_se if cfg.monitor == "loss" else _macro_f1_se(val)
            row = distributed.broadcast_object(row)  # every rank takes rank 0's decisions
            state["history"].append(row)
            if cfg.monitor == "none":  # the whole schedule runs; its final weights are kept
                improved = choose(state, epoch, float(epoch), 0.0)
            else:
                score = -row["val_loss"] if cfg.monitor == "loss" else row["val_macro_f1"]
                improved = choose(state, epoch, score, row[f"val_{cfg.monitor}_se"])
            if improved:
                save_checkpoint(run.checkpoint, evaluated, prep.meta, epoch=epoch)
            bar.update(task, info=f"loss {train_loss:.4f} | val loss {row['val_loss']:.4f} "
                                  f"acc {row['val_accuracy']:.4f} F1 {row['val_macro_f1']:.4f}" + (" *" if improved else ""))
        state["epoch"], state["seconds"] = epoch, time.perf_counter() - started
        release_freed_memory()  # once an epoch: the kept heap (keep_freed_memory) cannot drift far
        _write_history(run.history, state["history"])
        save_checkpoint(run.last_checkpoint, evaluated, prep.meta, train_state_dict=net.state_dict(),
                        ema=ema.state_dict() if ema is not None else None, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), state=state, rng=_get_rng())
        if phase == "all" and epoch - max(state["best_epoch"], r["freeze_epochs"]) >= r["patience"]:
            log(f"early stop: no validation {cfg.monitor} within noise of the best for {r['patience']} epochs")
            break

    from featurepipe.plots import training_curves

    training_curves(state["history"], run.cnn / "curves.png")
    distributed.barrier()  # rank 0 has written the best checkpoint that every rank loads now
    best = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    evaluated.load_state_dict(best["state_dict"])
    recalibrate_batchnorm(evaluated, prep.dataset(train_idx), device, cfg.amp)
    save_checkpoint(run.checkpoint, evaluated, prep.meta, epoch=best["epoch"])
    return evaluated, {
        "best_epoch": best["epoch"], "epochs_run": state["epoch"], "monitor": cfg.monitor, "seed": cfg.seed,
        "train_seconds": round(state["seconds"], 1), "val_best": state["history"][best["epoch"] - 1],
    }


@torch.no_grad()
def recalibrate_batchnorm(net: Net, ds: fdata.ImageDataset, device: torch.device, amp: bool | None) -> None:
    """BatchNorm's running statistics recomputed on the un-augmented training images (as SWA's
    `update_bn`): during training they follow augmented batches, and the EMA averages them over
    weights that moved, so eval mode would normalise with statistics of images it never sees."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
    training = net.training
    net.train()
    try:
        for x, _, k, why in fdata.make_loader(ds, 256, pin_memory=device.type == "cuda", once=True):
            ds.check(k, why)
            with autocast(device, amp):
                net.forward_features(to_device(x, device))
    finally:
        for m in norms:
            m.momentum = momenta[m]
        net.train(training)


def choose(state: dict[str, Any], epoch: int, score: float, error: float) -> bool:
    """Keep this epoch's weights? Yes if its score beats the best so far, or lies within one standard
    error of it (the one-standard-error rule): on a few hundred validation images, scores swing by
    several points from epoch to epoch, and a later epoch that is as good within that noise has seen
    more training and the annealed learning rate. Higher scores are better."""
    best = state["best"]
    if best is None or score > best:
        state["best"], state["best_se"] = score, error
    elif score < best - state["best_se"]:
        return False
    state["best_epoch"] = epoch
    return True


def _val_loss(p: Predictions, class_weights: np.ndarray) -> tuple[float, float]:
    """The training criterion (class-weighted cross-entropy) on held-out predictions, and its standard error."""
    w = class_weights[p.y_true]
    nll = -np.log(np.clip(p.proba[np.arange(len(p.y_true)), p.y_true], 1e-12, 1.0))
    mean = float((w * nll).sum() / w.sum())
    return mean, float(np.sqrt(np.sum((w * (nll - mean)) ** 2)) / w.sum())  # SE of a weighted mean


def _macro_f1_se(p: Predictions, resamples: int = 200) -> float:
    """Bootstrap standard error of macro F1 (no closed form); vectorised over resamples, a few ms."""
    k, n = len(p.class_names), len(p.y_true)
    picks = np.random.default_rng(0).integers(0, n, size=(resamples, n))
    cells = p.y_true[picks] * k + p.y_pred[picks] + (np.arange(resamples) * k * k)[:, None]
    conf = np.bincount(cells.ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
    f1 = 2 * np.diagonal(conf, axis1=1, axis2=2) / np.maximum(conf.sum(axis=1) + conf.sum(axis=2), 1)
    return float(f1.mean(axis=1).std())


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (K * n_c): every class weighs as much in the loss as it would in a balanced set."""
    return len(labels) / (n_classes * np.maximum(np.bincount(labels, minlength=n_classes), 1))


class BalancedSampler(torch.utils.data.Sampler):
    """Draws every class equally often (with replacement); an epoch keeps the data set's length.

    Under torchrun every rank draws the same epoch (one seed, set per epoch through `generator`) and
    keeps its own interleaved share of it, so the ranks' shares are disjoint and together balanced.
    """

    def __init__(self, labels: np.ndarray, n_classes: int, rank: int = 0, world: int = 1) -> None:
        counts = np.bincount(labels, minlength=n_classes)
        self.weights = torch.as_tensor(1.0 / np.maximum(counts, 1), dtype=torch.float64)[torch.as_tensor(labels)]
        self.rank, self.world, self.num_samples = rank, world, len(labels) // world
        self.generator = torch.Generator()

    def __iter__(self):
        drawn = torch.multinomial(self.weights, self.num_samples * self.world, replacement=True,
                                  generator=self.generator)
        return iter(drawn[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.num_samples


def evaluate(prep: Prepared, net: Net | None, idx: np.ndarray, proba: np.ndarray | None = None) -> Predictions:
    """Predictions on catalog indices `idx`: from `net`, or wrapping given probabilities."""
    names = prep.catalog.class_names
    if proba is None:
        loader = fdata.make_loader(prep.dataset(idx), 256, pin_memory=prep.device.type == "cuda")
        return predict(net, loader, prep.device, prep.cfg.amp, ids=prep.ids(idx), class_names=names)
    return Predictions(prep.ids(idx), prep.catalog.labels[idx], proba, names)


def _phase(epoch: int, freeze_epochs: int) -> str:
    return "head" if epoch <= freeze_epochs else "all"


def _optimizer(net: Net, cfg: TrainConfig, phase: str, steps_per_epoch: int):
    """AdamW + one-cycle schedule for a phase. Pretrained backbones get lower, layer-wise rates."""
    r = cfg.resolved
    lr = r["lr"]
    for p in net.features.parameters():
        p.requires_grad_(phase == "all")
    if phase == "head":
        groups, epochs = [{"params": list(net.head.parameters()), "lr": lr}], r["freeze_epochs"]
    else:
        epochs = r["epochs"]
        groups = [{"params": list(net.head.parameters()), "lr": lr}]
        backbone = [p for p in net.features.parameters()]
        if r["weights"]:
            # Discriminative rates: early layers (generic edges, textures) move least. Three groups,
            # from lr * ratio for the first third to lr * ratio^(1/3) for the last.
            chunks = np.array_split(np.arange(len(backbone)), 3)
            groups += [{"params": [backbone[i] for i in chunk], "lr": lr * cfg.lr_backbone_ratio ** ((3 - k) / 3)}
                       for k, chunk in enumerate(chunks) if len(chunk)]
        else:
            groups += [{"params": backbone, "lr": lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15)
    return optimizer, scheduler


# Options a resumed run must share with its first start (device, amp and --on-bad-image may change).
RESUME_KEEPS = ("arch", "weights", "epochs", "freeze_epochs", "batch_size", "img_size", "lr", "lr_backbone_ratio",
                "weight_decay", "label_smoothing", "augment", "sampler", "monitor", "patience", "ema", "folds", "seed")


def _resumable(run: RunPaths) -> bool:
    return run.last_checkpoint.exists() or any(run.root.glob("folds/*/cnn/last.pt"))


def _check_run_dir(run: RunPaths, data: str, cfg: TrainConfig) -> TrainConfig:
    """The options to train with: as given, or on --resume the run's own where one is left out."""
    if cfg.resume:
        if not _resumable(run):
            raise FeaturepipeError(f"--resume: {run.last_checkpoint} does not exist; start the run without --resume")
        old = read_json(require(run.config, "run config", "start the run over without --resume"))
        if old["data"]["source"] not in (data, str(Path(data).expanduser())):
            # Moved data are fine; other data are not (the fingerprint tells them apart).
            catalog = fdata.scan(data, cfg.allow_outside)
            if data_fingerprint(catalog) != old["data"].get("fingerprint"):
                raise FeaturepipeError(f"--resume: {run.root} was trained on {old['data']['source']}, not {data}")
            log(f"warning: {run.root} was trained on {old['data']['source']}; {data} holds the same data")
        return _resumed_options(cfg, old["train"])
    if (is_finished(run) or _resumable(run)) and not cfg.overwrite:
        raise FeaturepipeError(
            f"--out {run.root}: already holds a trained CNN; pass --overwrite to replace it, or --resume to continue"
        )
    others = sorted(p.name for p in run.root.iterdir() if p.name != ".lock") if run.root.is_dir() else []
    if others and not is_run(run.root) and not cfg.overwrite:
        raise FeaturepipeError(f"--out {run.root}: holds other files ({', '.join(others[:3])}"
                               f"{', ...' if len(others) > 3 else ''}) and is no featurepipe run; give a new or "
                               "empty folder, or pass --overwrite")
    return cfg


def _resumed_options(cfg: TrainConfig, old: dict[str, Any]) -> TrainConfig:
    """Options left automatic take the run's; one given otherwise than the run had is refused."""
    # --arch's default is "auto", not None: left out (or auto), it means the run's own.
    left_out = {k for k in RESUME_KEEPS if getattr(cfg, k) is None or (k == "arch" and cfg.arch == "auto")}
    cfg = replace(cfg, **{k: old[k] for k in left_out if k in old})
    for k in RESUME_KEEPS:
        was = old.get(k) if old.get(k) is not None else old.get("resolved", {}).get(k)
        # An option the run left to auto may be given as what auto chose (--arch efficientnet_lite0).
        if k in old and getattr(cfg, k) is not None and getattr(cfg, k) not in (was, old.get("resolved", {}).get(k)):
            raise FeaturepipeError(f"--resume: --{k.replace('_', '-')} {getattr(cfg, k)} differs from the run's {was}; "
                                   "resume with the run's options, or start over with --overwrite")
    return cfg


def _start_over(run: RunPaths) -> None:
    """A run trained again forgets that it was finished and where it stopped, before anything else is
    written: an interrupted --overwrite must neither pass for finished nor resume the previous run."""
    for path in (run.cnn_metrics, run.last_checkpoint, *run.root.glob("folds/*/cnn/last.pt"),
                 *run.root.glob("folds/*/cnn/metrics.json")):
        path.unlink(missing_ok=True)


def _diverged(what: str, value: float, lr: float) -> FeaturepipeError:
    return FeaturepipeError(f"training diverged: {what} became {value} (peak learning rate {lr:g}); "
                            "lower --lr, or check the images for extreme values")


def _load_resume_state(path: Path) -> dict[str, Any]:
    """last.pt with weights_only=True: tensors and plain containers only, so a planted file runs no code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeaturepipeError(f"{path}: cannot be loaded safely as a featurepipe resume state ({first_line(e)}); "
                               "start over with --overwrite") from None


def _images_per_epoch(loader) -> int:
    return len(loader) * loader.batch_size if loader.drop_last else len(loader.dataset)


def _ema(net: Net, total_steps: int):
    """Exponential moving average of the weights (and batch-norm statistics) over the last ~5 % of steps.

    Small medical validation sets swing from epoch to epoch with the last few batches; the average
    of recent weights is steadier and generalises better. Its horizon scales with the schedule, so a
    two-epoch run is not judged on weights from its first, untrained steps.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    decay = 1.0 - 1.0 / max(2.0, total_steps / 20)
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _train_epoch(net, loader, criterion, optimizer, scheduler, scaler, device, amp, frozen, bar, task, ema=None,
                 augment=None):
    net.train()
    if frozen:
        getattr(net, "module", net).features.eval()  # a frozen backbone keeps its batch-norm statistics
    total_loss, correct, seen = 0.0, 0, 0
    for x, y, k, why in loader:
        loader.dataset.check(k, why)  # only a file changed since prepare() checked it can fail here
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        if augment is not None:  # on the model's own [0, 1] scale (its intensity window applied first)
            x = augment(getattr(net, "module", net).scale(x)).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = net(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(net, "module", net))
        n = len(y)
        value = loss.item()
        if not math.isfinite(value) and not scaler.is_enabled():  # fp16's scaler skips such steps itself
            raise _diverged("the training loss", value, max(g["lr"] for g in optimizer.param_groups))
        total_loss += value * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        bar.update(task, advance=n, info=f"loss {total_loss / seen:.4f}")
    return total_loss / seen, correct / seen


@torch.inference_mode()
def predict(net: Net, loader, device: torch.device, amp: bool | None, ids: list[str] | None,
            class_names: list[str]) -> Predictions:
    """Softmax probabilities for every image of a loader, in loader order."""
    net.eval()
    probs, labels = [], []
    for x, y, k, why in loader:
        loader.dataset.check(k, why)
        with autocast(device, amp):
            logits = net(to_device(x, device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
    proba = torch.cat(probs).numpy().astype(np.float64)
    y_true = torch.cat(labels).numpy().astype(np.int64)
    return Predictions(ids or [str(i) for i in range(len(y_true))], y_true, proba, class_names)


def _macro_f1(p: Predictions) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(p.y_true, p.y_pred, labels=np.arange(len(p.class_names)), average="macro",
                          zero_division=0))


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def _get_rng() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers, so last.pt loads with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, python_gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                     "gauss": float(gauss)},
           "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": python_gauss}}
    if torch.cuda.is_available():  # augmentation draws on the training device
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n, p = rng["numpy"], rng["python"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
