"""Training the end-to-end CNN, read top to bottom: model → loop → chosen checkpoint → test, on the data
prepare.py read and with the options it resolved; k-fold (--folds) is a loop over `fit`.

AMP, the GPU, frozen-backbone fine-tuning, balanced sampling and k-fold are options of the same
loop (engine.Trainer), not forks of it; `fit` picks the callbacks (featurepipe/callbacks.py) a run's
options ask for.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from featurepipe import data as fdata
from featurepipe import defaults, distributed, resume
from featurepipe.callbacks import (DDP, EMA, EarlyStopping, Extend, FreezePhase, History, KeepBest, Progress,
                                   ResumeState, SeedEpochs)
from featurepipe.data.balance import BalancedSampler, balanced_class_weights
from featurepipe.data.fingerprint import check_same_data, data_fingerprint
from featurepipe.device import autocast, to_device
from featurepipe.engine import Callback, Trainer, diverged
from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import (Predictions, clearly_above, macro_f1, majority_baseline, save_evaluation,
                                  save_predictions, scores)
from featurepipe.files import atomic_path, read_json, write_json
from featurepipe.models import Net, create_model, save_checkpoint
from featurepipe.options import TrainConfig
from featurepipe.prepare import Prepared, Resolved, prepare, training_device
from featurepipe.progress import log
from featurepipe.runs import RunPaths, environment, run_paths


def drops_last(n: int, batch_size: int) -> bool:
    """Drop the last partial batch only when it is small (under a quarter of a batch): a batch of one
    or two images gives BatchNorm nothing to normalise with, but a large remainder is data."""
    return n > batch_size and n % batch_size < batch_size / 4


def train(data: str, out: str | Path, cfg: TrainConfig, callbacks: Sequence[Callback] = (),
          splits: dict[str, list[str]] | None = None) -> dict[str, Any] | None:
    """train-cnn: the run's metrics (None on torchrun's ranks other than 0). `callbacks` join every fit's own.
    `splits` (image ids per split) replaces the split featurepipe would make: a fold of `crossval`."""
    run = run_paths(out)
    fold = splits is not None
    cfg = resume.check_run_dir(run, data, cfg, fold=fold)
    prep = prepare(data, cfg, training_device(cfg.device),
                   read_json(run.splits) if cfg.resume and run.splits.exists() else splits)
    cfg, catalog, splits = prep.cfg, prep.catalog, prep.splits
    if cfg.resume:
        check_same_data(read_json(run.config), catalog, "--resume")
    # Rank 0 writes the run; under torchrun the other ranks train in step with it and write nothing.
    main = distributed.is_main()
    if main and not cfg.resume:  # a resumed run keeps the list its first start wrote
        resume.start_over(run)
        fdata.save_skipped(run.skipped, prep.skipped)
    if main:
        # A crossval fold's test, like a split featurepipe draws, comes from the pool its val comes from.
        given = (read_json(run.config)["data"].get("test_given") if cfg.resume
                 else not fold and catalog.given_split is not None)
        _write_config(run, prep, given)
    r = prep.resolved
    if cfg.arch == "auto":
        log(f"--arch auto: {r.arch}" + (" (ImageNet weights)" if r.weights else "") + f": {r.arch_reason}")
    if r.intensity["low_range"]:
        log(f"intensity: {r.intensity['description']}")
    log(f"training {r.arch} on {prep.device.type}: {len(splits['train'])} train / {len(splits['val'])} val "
        f"images, {r.img_size} px, {r.in_channels} channel(s), {r.epochs} epochs of batches of "
        f"{r.batch_size}, augment={r.augment}" + (f", test-time views {r.tta}" if r.tta != "none" else "")
        + (f", {cfg.folds} folds" if cfg.folds > 1 else ""))
    log(prep.precision.describe(prep.device))
    result = cross_validate(prep, run, callbacks) if cfg.folds > 1 else single(prep, run, callbacks)
    if main:
        write_json(run.cnn_metrics, result)
        log(f"test accuracy {result['test']['accuracy']:.4f}, macro F1 {result['test']['macro_f1']:.4f} "
            f"→ {run.checkpoint}")
    return result


def _write_config(run: RunPaths, prep: Prepared, test_given: bool | None) -> None:
    cfg, catalog, splits = prep.cfg, prep.catalog, prep.splits
    write_json(run.splits, fdata.split_ids(catalog, splits))
    write_json(run.config, {
        "command": "train-cnn",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "source": catalog.source, "kind": catalog.kind, "class_names": catalog.class_names,
            "fingerprint": prep.resolved.data_fingerprint,
            "index_fingerprint": data_fingerprint(catalog, contents=False),
            "counts": {s: np.bincount(catalog.labels[idx], minlength=len(catalog.class_names)).tolist()
                       for s, idx in splits.items()},
            "test_given": test_given,
        },
        "train": {**asdict(cfg), "resolved": asdict(prep.resolved)},
        "model": prep.meta,
        "environment": environment(),
    })


def single(prep: Prepared, run: RunPaths, callbacks: Sequence[Callback] = ()) -> dict[str, Any] | None:
    """One model on train, checkpoint chosen on val, evaluated once on test (by rank 0: None elsewhere)."""
    splits = prep.splits
    net, fitted = fit(prep, splits["train"], splits["val"], run, callbacks)
    if not distributed.is_main():
        return None
    val = evaluate(prep, net, splits["val"])
    save_predictions(run.predictions("cnn", "val"), val)
    fitted["val_baseline"] = check_learned(prep, val)
    t0 = time.perf_counter()
    test = evaluate(prep, net, splits["test"])
    predict_seconds = time.perf_counter() - t0
    return {**fitted, "predict_seconds_per_image": predict_seconds / len(test.ids),
            "test": save_evaluation(run.predictions("cnn"), run.report("cnn"), test)}


def check_learned(prep: Prepared, val: Predictions) -> dict[str, Any]:
    """The final CNN against the majority-class baseline on val, with a warning where it is not clearly above.
    Where val is so small that even a perfect score would not be clearly above, the comparison cannot tell
    either way, and says so instead of warning."""
    base = majority_baseline(np.bincount(prep.catalog.labels[prep.splits["train"]], minlength=len(val.class_names)), val)
    acc, n = float((val.y_pred == val.y_true).mean()), len(val.y_true)
    learned = clearly_above(acc, base["accuracy"], n)
    can_tell = clearly_above(1.0, base["accuracy"], n)
    if not can_tell:
        log(f"val's {n} images are too few to tell whether the CNN learned more than the majority class (always "
            f"'{base['class']}', accuracy {base['accuracy']:.4f}): not even all {n} right would be clearly above it.")
    elif not learned:
        log(f"[bold red]warning[/]: the CNN's val accuracy {acc:.4f} is not clearly above the majority-class baseline "
            f"{base['accuracy']:.4f} (always '{base['class']}'): no evidence that it learned the task. Check the "
            "images (featurepipe data inspect) and the training curves (cnn/curves.png) before trusting any "
            "comparison built on it.")
    return {"accuracy": base["accuracy"], "class": base["class"], "cnn_clearly_above": learned, "can_tell": can_tell}


def cross_validate(prep: Prepared, run: RunPaths, callbacks: Sequence[Callback] = ()) -> dict[str, Any] | None:
    """Stratified k-fold on train+val: out-of-fold predictions, and the fold-averaged ensemble on test
    (by rank 0: None elsewhere).

    Where the source has groups (patients), each group's images stay in one fold, as in every split
    featurepipe makes. RUN/cnn/model.pt becomes the fold model with the best validation score, so
    extract and the heads work as after a single fit; the CNN's test predictions are the ensemble's.
    """
    cfg, splits = prep.cfg, prep.splits
    pool = np.concatenate([splits["train"], splits["val"]])
    labels = prep.catalog.labels[pool]
    fewest = int(np.bincount(labels).min())
    if fewest < cfg.folds:
        raise FeaturepipeError(f"--folds {cfg.folds}: a class has only {fewest} image(s) in train and val; "
                               "use fewer folds")
    groups = None if prep.catalog.groups is None else np.asarray(prep.catalog.groups)[pool]
    folds = fdata.splits.kfold(labels, cfg.folds, cfg.seed, groups, "train and val hold")
    oof = np.zeros((len(pool), len(prep.catalog.class_names)))
    test_probas, per_fold = [], []
    main = distributed.is_main()
    for k, (tr, va) in enumerate(folds, start=1):
        log(f"fold {k}/{cfg.folds}")
        fold_run = run.fold(k)
        net, fitted = fit(prep, pool[tr], pool[va], fold_run, callbacks)
        if not main:  # rank 0 evaluates and writes the fold; the others go on to the next fit
            continue
        val, test = evaluate(prep, net, pool[va]), evaluate(prep, net, splits["test"])
        oof[va] = val.proba
        test_probas.append(test.proba)
        save_predictions(fold_run.predictions("cnn", "val"), val)
        fold_result = {"fold": k, **fitted, "val": scores(val),
                       "test": save_evaluation(fold_run.predictions("cnn"), fold_run.report("cnn"), test)}
        write_json(fold_run.cnn_metrics, fold_result)
        per_fold.append(fold_result)
    if not main:
        return None
    best = max(per_fold, key=lambda f: f["val"]["macro_f1"] if cfg.monitor == "macro_f1" else -f["val"]["log_loss"])
    with atomic_path(run.checkpoint) as tmp:
        shutil.copyfile(run.fold(best["fold"]).checkpoint, tmp)
    oof_pred = Predictions(prep.ids(pool), prep.catalog.labels[pool], oof, prep.catalog.class_names)
    save_predictions(run.predictions("cnn", "oof"), oof_pred)
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


def fit(prep: Prepared, train_idx: np.ndarray, val_idx: np.ndarray, run: RunPaths,
        callbacks: Sequence[Callback] = ()) -> tuple[Net, dict[str, Any]]:
    """Train one model; keep the chosen epoch's weights (see `choose` and --monitor) and return them
    loaded. `callbacks` go after the run's own (see featurepipe/callbacks.py)."""
    cfg, r, device = prep.cfg, prep.resolved, prep.device
    n_classes = len(prep.catalog.class_names)
    pin = device.type == "cuda"
    train_ds = prep.dataset(train_idx)
    augment = fdata.augmentation(r.augment)  # per image, on whole batches on the device
    world = distributed.world_size()
    # Each process sees its own shard of every epoch; the global batch stays --batch-size.
    sampler = None
    if cfg.sampler == "balanced":
        sampler = BalancedSampler(train_ds.labels, n_classes, distributed.rank(), world)
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, world, distributed.rank(), shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    train_loader = fdata.make_loader(train_ds, max(1, r.batch_size // world), shuffle=True, seed=cfg.seed,
                                     pin_memory=pin, drop_last=drops_last(len(train_ds), r.batch_size),
                                     sampler=sampler)
    val_loader = fdata.make_loader(prep.dataset(val_idx), 256, pin_memory=pin)
    # On a GPU, images in memory are copied there once and batches sliced there (data/gpu.py).
    train_loader, val_loader = fdata.gpu.on_device(train_loader, device), fdata.gpu.on_device(val_loader, device)

    net = create_model(r.arch, n_classes, r.in_channels, r.mean, r.std, r.weights,
                       window=tuple(r.window))
    net = net.to(device, memory_format=torch.channels_last)
    if world > 1:
        torch.manual_seed(cfg.seed + 1000 * distributed.rank())  # different augmentation on each rank
    total = r.freeze_epochs + r.epochs
    ema = EMA(net, total * len(train_loader)) if cfg.ema else None
    # Imbalance: class-weighted loss, unless the sampler already balances the batches.
    class_weights = np.ones(n_classes) if sampler else balanced_class_weights(train_ds.labels, n_classes)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32, device=device),
                                    label_smoothing=cfg.label_smoothing)
    forward, step = prep.precision.forward, prep.precision.train_step  # autocast or not, for each kind of pass
    validation = Validation(val_loader, device, forward, prep.catalog.class_names, class_weights, r.lr)
    phases = FreezePhase(r.freeze_epochs, r.epochs,
                         lambda phase, epochs, lr_scale: _optimizer(net, cfg, r, phase, len(train_loader), epochs,
                                                                    lr_scale))
    trainer = Trainer(net, train_loader, criterion, device, step, augment, validation, epochs=total, callbacks=[
        phases,  # first: the epoch's optimizer, which DDP wraps
        *([DDP()] if world > 1 else []),
        SeedEpochs(train_loader, sampler, cfg.seed),
        *([ema] if ema else []),
        # The choice before what shows and records it: the bar's *, history.csv, last.pt.
        KeepBest(cfg.monitor, functools.partial(validation.error, cfg.monitor), run.checkpoint, prep.meta),
        Progress(),
        History(run),
        EarlyStopping(cfg.monitor, r.patience, r.freeze_epochs),
        *([Extend(phases, defaults.still_learning, functools.partial(validation.error, "loss"),
                  defaults.extension_epochs, defaults.EXTEND_LR_SCALE, r.extend_max)]
          if r.extend_max else []),
        ResumeState(run, prep.meta, cfg.resume, phases, ema),  # after all that changes the state it saves
        *callbacks,
    ])
    trainer.fit()

    distributed.barrier()  # rank 0 has written the best checkpoint that every rank loads now
    best = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    evaluated = trainer.evaluated
    evaluated.load_state_dict(best["state_dict"])
    recalibrate_batchnorm(evaluated, prep.dataset(train_idx), device, forward)
    if distributed.is_main():
        save_checkpoint(run.checkpoint, evaluated, prep.meta, epoch=best["epoch"])
    state = trainer.state
    return evaluated, {
        "best_epoch": best["epoch"], "epochs_run": state["epoch"], "extensions": state.get("extensions", []),
        "monitor": cfg.monitor, "seed": cfg.seed,
        "train_seconds": round(state["seconds"], 1), "val_best": state["history"][best["epoch"] - 1],
    }


class Validation:
    """Scores the weights on val after every epoch: the history's val_* columns."""

    def __init__(self, loader, device: torch.device, amp: bool | None, class_names: list[str],
                 class_weights: np.ndarray, lr: float) -> None:
        self.loader, self.device, self.amp, self.class_names = loader, device, amp, class_names
        self.class_weights, self.lr = class_weights, lr

    def __call__(self, net: Net) -> dict[str, float]:
        val = predict_loader(net, self.loader, self.device, self.amp, ids=None, class_names=self.class_names)
        if not np.isfinite(val.proba).all():
            raise diverged("the validation predictions", float("nan"), self.lr)
        loss, self.loss_se = _val_loss(val, self.class_weights)
        self.predictions = val
        return {"val_loss": loss, "val_accuracy": float((val.y_pred == val.y_true).mean()),
                "val_macro_f1": macro_f1(val.y_true, val.y_pred, len(val.class_names))}

    def error(self, monitor: str) -> float:
        """The standard error of the last epoch's `monitor` (loss or macro_f1)."""
        return self.loss_se if monitor == "loss" else _macro_f1_se(self.predictions)


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


def evaluate(prep: Prepared, net: Net | None, idx: np.ndarray, proba: np.ndarray | None = None) -> Predictions:
    """Predictions on catalog indices `idx`: from `net`, or wrapping given probabilities."""
    names = prep.catalog.class_names
    if proba is None:
        loader = fdata.make_loader(prep.dataset(idx), 256, pin_memory=prep.device.type == "cuda")
        return predict_loader(net, loader, prep.device, prep.precision.forward, ids=prep.ids(idx), class_names=names,
                              tta=prep.resolved.tta)
    return Predictions(prep.ids(idx), prep.catalog.labels[idx], proba, names)


def _optimizer(net: Net, cfg: TrainConfig, r: Resolved, phase: str, steps_per_epoch: int, epochs: int | None = None,
               lr_scale: float = 1.0):
    """AdamW + one-cycle schedule for a phase of `epochs` (by default the run's), peaking at `lr_scale` × the
    run's rates. Pretrained backbones get lower, layer-wise rates."""
    lr = r.lr * lr_scale
    for p in net.features.parameters():
        p.requires_grad_(phase == "all")
    if epochs is None:
        epochs = r.freeze_epochs if phase == "head" else r.epochs
    if phase == "head":
        groups = [{"params": list(net.head.parameters()), "lr": lr}]
    else:
        groups = [{"params": list(net.head.parameters()), "lr": lr}]
        backbone = [p for p in net.features.parameters()]
        if r.weights:
            # Discriminative rates: early layers (generic edges, textures) move least. Three groups,
            # from lr * ratio for the first third to lr * ratio^(1/3) for the last.
            chunks = np.array_split(np.arange(len(backbone)), 3)
            groups += [{"params": [backbone[i] for i in chunk], "lr": lr * r.lr_backbone_ratio ** ((3 - k) / 3)}
                       for k, chunk in enumerate(chunks) if len(chunk)]
        else:
            groups += [{"params": backbone, "lr": lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15)
    return optimizer, scheduler


@torch.inference_mode()
def predict_loader(net: Net, loader, device: torch.device, amp: bool | None, ids: list[str] | None,
                   class_names: list[str], tta: str = "none") -> Predictions:
    """Softmax probabilities for every image of a loader, in loader order, its logits averaged over `tta` views."""
    net.eval()
    probs, labels = [], []
    for x, y, k, why in loader:
        loader.dataset.check(k, why)
        with autocast(device, amp):
            logits = net.logits(to_device(x, device), tta)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
    proba = torch.cat(probs).numpy().astype(np.float64)
    y_true = torch.cat(labels).numpy().astype(np.int64)
    return Predictions(ids or [str(i) for i in range(len(y_true))], y_true, proba, class_names)

