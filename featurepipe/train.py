"""Training the end-to-end CNN, read top to bottom: data → model → loop → best checkpoint → test.

AMP and the GPU are flags, not forks: the same loop runs on the CPU and on CUDA.
"""

from __future__ import annotations

import csv
import io
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurepipe import data as fdata
from featurepipe.device import autocast, needs_grad_scaler, resolve_device, to_device
from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, save_evaluation, save_predictions
from featurepipe.models import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Net,
    create_model,
    in_channels_for,
    min_img_size,
    save_checkpoint,
)
from featurepipe.progress import log, progress_bar
from featurepipe.runs import RunPaths, environment, read_json, run_paths, write_json, write_text

MONITORS = ("macro_f1", "loss")


@dataclass
class TrainConfig:
    """Options of train-cnn. None means: chosen from the data in front of it (see `resolve`)."""

    arch: str = "sixblock"
    weights: str | None = None
    epochs: int | None = None
    batch_size: int = 64
    img_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: str = "auto"
    monitor: str = "macro_f1"
    patience: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    overwrite: bool = False
    on_bad_image: str = "skip"
    resolved: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise FeaturepipeError(f"--arch {self.arch}: unknown architecture; choose one of {', '.join(ARCHS)}")
        if self.augment not in fdata.AUGMENTATIONS:
            raise FeaturepipeError(f"--augment {self.augment}: choose one of {', '.join(fdata.AUGMENTATIONS)}")
        if self.monitor not in MONITORS:
            raise FeaturepipeError(f"--monitor {self.monitor}: choose one of {', '.join(MONITORS)}")
        for name in ("epochs", "batch_size", "img_size", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FeaturepipeError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.img_size is not None and self.img_size < min_img_size(self.arch):
            raise FeaturepipeError(f"--img-size {self.img_size}: too small; {self.arch} needs at least "
                                   f"{min_img_size(self.arch)} px")
        fdata.check_policy(self.on_bad_image)
        if self.lr is not None and not self.lr > 0:
            raise FeaturepipeError(f"--lr {self.lr}: must be positive")


def auto_img_size(arch: str, short_side: int) -> int:
    """Native size for small images; large scans are shrunk to what the model can learn from on a CPU."""
    cap = 128 if arch == "sixblock" else 224
    return int(min(cap, max(min_img_size(arch), short_side)))


def auto_epochs(n_train: int) -> int:
    # About 40k image presentations, 10 to 60 epochs: 60 for a few hundred images (small data sets
    # need many passes, and early stopping ends them sooner), 10 for 4 000 and more.
    return int(min(60, max(10, math.ceil(40_000 / n_train))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(data: str, out: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    cfg.validate()
    run = run_paths(out)
    _check_run_dir(run, data, cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    # Data: the split is decided once and saved; image size, channels and stats come from train images.
    catalog = fdata.scan(data)
    saved = read_json(run.splits) if cfg.resume and run.splits.exists() else None
    splits = fdata.assign_splits(catalog, cfg.seed, saved)
    cfg = resolve(cfg, catalog, splits)
    r = cfg.resolved
    stores, splits, skipped = fdata.load_splits(catalog, splits, r["img_size"], r["in_channels"], cfg.on_bad_image)
    if saved is None:  # a resumed run keeps the list its first start wrote
        fdata.save_skipped(run.skipped, skipped)
    meta = {
        "arch": cfg.arch, "num_classes": len(catalog.class_names), "in_channels": r["in_channels"],
        "mean": r["mean"], "std": r["std"], "img_size": r["img_size"], "class_names": catalog.class_names,
    }
    write_json(run.splits, fdata.split_ids(catalog, splits))
    write_json(run.config, {
        "command": "train-cnn",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "source": catalog.source, "kind": catalog.kind, "class_names": catalog.class_names,
            "counts": {s: np.bincount(catalog.labels[idx], minlength=len(catalog.class_names)).tolist()
                       for s, idx in splits.items()},
        },
        "train": asdict(cfg),
        "model": meta,
        "environment": environment(),
    })

    def dataset(split: str, transform=None) -> fdata.ImageDataset:
        store, idx = stores[split]
        return fdata.ImageDataset(store, idx, catalog.labels[splits[split]], r["img_size"], r["in_channels"],
                                  transform)

    pin = device.type == "cuda"
    train_ds = dataset("train", fdata.augmentation(r["augment"], r["in_channels"]))
    train_loader = fdata.make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, pin_memory=pin,
                                     drop_last=len(train_ds) > cfg.batch_size)
    val_loader = fdata.make_loader(dataset("val"), 256, pin_memory=pin)

    # Model, loss (class-weighted: these data sets are imbalanced), optimiser, schedule.
    net = create_model(cfg.arch, len(catalog.class_names), r["in_channels"], r["mean"], r["std"], cfg.weights)
    net = net.to(device, memory_format=torch.channels_last)
    counts = np.bincount(train_ds.labels, minlength=len(catalog.class_names))
    class_weights = len(train_ds.labels) / (len(counts) * np.maximum(counts, 1))
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32, device=device),
                                    label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=cfg.weight_decay)
    steps = r["epochs"] * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=r["lr"], total_steps=steps, pct_start=0.15)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))

    state = {"epoch": 0, "best": None, "best_epoch": 0, "history": []}
    if cfg.resume and run.last_checkpoint.exists():
        state = _resume(run.last_checkpoint, net, optimizer, scheduler, scaler)
        log(f"resuming {run.root} after epoch {state['epoch']}")

    log(f"training {cfg.arch} on {device.type}: {len(train_ds)} train / {len(val_loader.dataset)} val images, "
        f"{r['img_size']} px, {r['in_channels']} channel(s), {r['epochs']} epochs, augment={r['augment']}")
    started = time.perf_counter()
    for epoch in range(state["epoch"] + 1, r["epochs"] + 1):
        t0 = time.perf_counter()
        # Seeded per epoch, so a resumed run shuffles exactly as an uninterrupted one would.
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        with progress_bar() as bar:
            task = bar.add_task(f"epoch {epoch}/{r['epochs']}", total=_images_per_epoch(train_loader), info="")
            train_loss, train_acc = _train_epoch(net, train_loader, criterion, optimizer, scheduler, scaler,
                                                 device, cfg.amp, bar, task)
            val = predict(net, val_loader, device, cfg.amp, ids=None, class_names=catalog.class_names)
            row = {
                "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": _weighted_log_loss(val, class_weights),
                "val_accuracy": float((val.y_pred == val.y_true).mean()),
                "val_macro_f1": _macro_f1(val),
                "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
            }
            state["history"].append(row)
            key = (row["val_macro_f1"], -row["val_loss"]) if cfg.monitor == "macro_f1" else (-row["val_loss"],)
            improved = state["best"] is None or key > tuple(state["best"])
            if improved:
                state["best"], state["best_epoch"] = list(key), epoch
                save_checkpoint(run.checkpoint, net, meta, epoch=epoch)
            bar.update(task, info=f"loss {train_loss:.4f} | val loss {row['val_loss']:.4f} "
                                  f"acc {row['val_accuracy']:.4f} F1 {row['val_macro_f1']:.4f}" + (" *" if improved else ""))
        state["epoch"] = epoch
        _write_history(run.history, state["history"])
        _save_last(run.last_checkpoint, net, optimizer, scheduler, scaler, state, meta)
        if epoch - state["best_epoch"] >= r["patience"]:
            log(f"early stop: no better validation {cfg.monitor} for {r['patience']} epochs")
            break
    train_seconds = time.perf_counter() - started

    # Test: the best checkpoint, never the last epoch's weights. Val predictions are kept for stacking.
    best = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(best["state_dict"])
    val = predict(net, val_loader, device, cfg.amp, ids=[catalog.ids[i] for i in splits["val"]],
                  class_names=catalog.class_names)
    save_predictions(run.predictions("cnn", "val"), val)
    t0 = time.perf_counter()
    test = predict(net, fdata.make_loader(dataset("test"), 256, pin_memory=pin), device, cfg.amp,
                   ids=[catalog.ids[i] for i in splits["test"]], class_names=catalog.class_names)
    predict_seconds = time.perf_counter() - t0
    test_scores = save_evaluation(run.predictions("cnn"), run.report("cnn"), test)
    result = {
        "best_epoch": best["epoch"], "epochs_run": state["epoch"], "monitor": cfg.monitor,
        "train_seconds": round(train_seconds, 1), "predict_seconds_per_image": predict_seconds / len(test.ids),
        "seed": cfg.seed, "test": test_scores, "val_best": state["history"][best["epoch"] - 1],
    }
    write_json(run.cnn / "metrics.json", result)
    from featurepipe.plots import training_curves

    training_curves(state["history"], run.cnn / "curves.png")
    log(f"best epoch {best['epoch']}: test accuracy {test_scores['accuracy']:.4f}, "
        f"macro F1 {test_scores['macro_f1']:.4f} → {run.checkpoint}")
    return result


def resolve(cfg: TrainConfig, catalog: fdata.Catalog, splits: dict[str, np.ndarray]) -> TrainConfig:
    """Fill every automatic option from the training images and record the choice."""
    train_idx = splits["train"]
    short_side, grey = fdata.describe_images(catalog.store, train_idx, cfg.seed)
    in_channels = in_channels_for(cfg.arch, grey)
    img_size = cfg.img_size or auto_img_size(cfg.arch, short_side)
    if cfg.weights is not None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = fdata.channel_stats(catalog.store, train_idx, img_size, in_channels, cfg.seed)
    epochs = cfg.epochs or auto_epochs(len(train_idx))
    resolved = {
        "img_size": img_size, "in_channels": in_channels, "median_short_side": short_side, "grey": grey,
        "epochs": epochs, "lr": cfg.lr or (3e-4 if cfg.weights else 2e-3),
        "patience": cfg.patience or max(8, epochs // 3),
        "augment": cfg.augment if cfg.augment != "auto" else ("light" if in_channels == 1 or grey else "rgb"),
        "mean": mean, "std": std,
    }
    return replace(cfg, resolved=resolved)


def _check_run_dir(run: RunPaths, data: str, cfg: TrainConfig) -> None:
    if cfg.resume:
        if not run.last_checkpoint.exists():
            raise FeaturepipeError(f"--resume: {run.last_checkpoint} does not exist; start the run without --resume")
        old = read_json(run.config)
        if old["data"]["source"] not in (data, str(Path(data).expanduser())):
            raise FeaturepipeError(f"--resume: {run.root} was trained on {old['data']['source']}, not {data}")
        return
    if run.checkpoint.exists() and not cfg.overwrite:
        raise FeaturepipeError(
            f"--out {run.root}: already holds a trained CNN; pass --overwrite to replace it, or --resume to continue"
        )


def _images_per_epoch(loader) -> int:
    return len(loader) * loader.batch_size if loader.drop_last else len(loader.dataset)


def _train_epoch(net, loader, criterion, optimizer, scheduler, scaler, device, amp, bar, task):
    net.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = net(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(y)
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        bar.update(task, advance=n, info=f"loss {total_loss / seen:.4f}")
    return total_loss / seen, correct / seen


@torch.inference_mode()
def predict(net: Net, loader, device: torch.device, amp: bool, ids: list[str] | None,
            class_names: list[str]) -> Predictions:
    """Softmax probabilities for every image of a loader, in loader order."""
    net.eval()
    probs, labels = [], []
    for x, y, _ in loader:
        with autocast(device, amp):
            logits = net(to_device(x, device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
    proba = torch.cat(probs).numpy().astype(np.float64)
    y_true = torch.cat(labels).numpy().astype(np.int64)
    return Predictions(ids or [str(i) for i in range(len(y_true))], y_true, proba, class_names)


def _weighted_log_loss(p: Predictions, class_weights: np.ndarray) -> float:
    """The training criterion (class-weighted cross-entropy) on held-out predictions."""
    w = class_weights[p.y_true]
    nll = -np.log(np.clip(p.proba[np.arange(len(p.y_true)), p.y_true], 1e-12, 1.0))
    return float((w * nll).sum() / w.sum())


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


def _save_last(path, net, optimizer, scheduler, scaler, state, meta) -> None:
    """Everything --resume needs to continue as if never stopped, RNG states included."""
    save_checkpoint(
        path, net, meta, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(), state=state,
        rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    )


def _resume(path, net, optimizer, scheduler, scaler) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    net.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    return ckpt["state"]
