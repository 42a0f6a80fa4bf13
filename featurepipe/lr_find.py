"""Learning-rate range test (Smith 2015, fastai's lr_find): raise the rate exponentially over a few
hundred batches and watch where the loss falls fastest.

Each batch is the training step itself (engine.Trainer.step): the same mixed precision, and on CUDA
with fp16 the same gradient scaler, as train-cnn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurepipe import data as fdata
from featurepipe import distributed
from featurepipe.data.balance import balanced_class_weights
from featurepipe.device import to_device
from featurepipe.engine import Trainer
from featurepipe.errors import FeaturepipeError
from featurepipe.files import atomic_path, write_json
from featurepipe.models import create_model
from featurepipe.options import TrainConfig
from featurepipe.prepare import prepare, training_device
from featurepipe.progress import log, progress_bar
from featurepipe.runs import check_output, check_outside, environment
from featurepipe.train import drops_last


def lr_find(data: str, out: str | Path, cfg: TrainConfig, start: float = 1e-6, end: float = 1.0,
            steps: int = 100) -> dict[str, Any]:
    """Writes OUT/lr_find.png and OUT/lr_find.json; returns the suggestion and the curve."""
    if steps < 2:
        raise FeaturepipeError(f"--steps {steps}: the sweep needs at least 2 batches")
    check_outside(Path(out), data)
    check_output(Path(out), "--out", folder=True)
    prep = prepare(data, cfg, training_device(cfg.device))
    r = prep.resolved
    n_classes = len(prep.catalog.class_names)
    train_ds = prep.dataset(prep.splits["train"])
    augment = fdata.augmentation(r.augment)
    loader = fdata.make_loader(train_ds, r.batch_size, shuffle=True, seed=cfg.seed,
                               drop_last=drops_last(len(train_ds), r.batch_size))
    net = create_model(r.arch, n_classes, r.in_channels, r.mean, r.std, r.weights,
                       window=tuple(r.window))
    net = net.to(prep.device, memory_format=torch.channels_last).train()
    weights = torch.tensor(balanced_class_weights(train_ds.labels, n_classes), dtype=torch.float32)
    criterion = nn.CrossEntropyLoss(weight=weights.to(prep.device))
    trainer = Trainer(net, loader, criterion, prep.device, prep.precision.train_step, augment)
    log(prep.precision.describe(prep.device))
    trainer.optimizer = torch.optim.AdamW(net.parameters(), lr=start, weight_decay=cfg.weight_decay)
    factor = (end / start) ** (1 / (steps - 1))

    lrs, losses, smooth, best = [], [], 0.0, float("inf")
    batches = iter(loader)
    with progress_bar("batch") as bar:
        task = bar.add_task("lr-find", total=steps, info="")
        for step in range(steps):
            try:
                x, y, k, why = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y, k, why = next(batches)
            loader.dataset.check(k, why)
            lr = start * factor**step
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            loss, _ = trainer.step(to_device(x, prep.device), y.to(prep.device, non_blocking=True))
            # Exponentially smoothed, bias-corrected: raw batch losses are too noisy to differentiate.
            smooth = 0.9 * smooth + 0.1 * loss.item()
            value = smooth / (1 - 0.9 ** (step + 1))
            lrs.append(lr)
            losses.append(value)
            best = min(best, value)
            bar.update(task, advance=1, info=f"lr {lr:.2e} loss {value:.4f}")
            if step > 10 and (value > 4 * best or not np.isfinite(value)):
                break
    suggestion = suggest(np.array(lrs), np.array(losses))
    out = Path(out)
    result = {"suggestion": suggestion, "lrs": lrs, "losses": losses, "arch": r.arch, "data": str(data),
              "seed": cfg.seed, "precision": r.precision, "environment": environment()}
    if distributed.is_main():  # under torchrun every rank sweeps alike; rank 0 writes
        write_json(out / "lr_find.json", result)
        _plot(lrs, losses, suggestion, out / "lr_find.png")
    log(f"suggested learning rate {suggestion:.2e} (steepest fall of the loss) → {out / 'lr_find.png'}")
    return result


def suggest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The rate where the smoothed loss falls fastest per log-step, before it reaches its minimum."""
    stop = int(np.argmin(losses)) + 1
    if stop < 3:
        return float(lrs[0])
    slope = np.gradient(losses[:stop], np.log(lrs[:stop]))
    return float(lrs[int(np.argmin(slope))])


def _plot(lrs, losses, suggestion, path: Path) -> None:
    from featurepipe.plots import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="#d62728", linestyle="--", label=f"suggestion {suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Learning-rate range test")
    ax.legend()
    ax.spines[["top", "right"]].set_visible(False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
