"""What every fit of a run shares: the data read, split and decoded once, and the options the data
decide (`resolve`, with the rules of defaults.py), recorded as a `Resolved`.

train-cnn and lr-find both start here (`prepare`); train.py is the fit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe import defaults, distributed
from featurepipe.data.fingerprint import data_fingerprint
from featurepipe.device import Precision, choose_precision, keep_freed_memory, resolve_device
from featurepipe.errors import FeaturepipeError
from featurepipe.models import ARCHS
from featurepipe.options import TrainConfig


@dataclass(frozen=True)
class Resolved:
    """What the rules chose for a run: config.json's `train.resolved`, in this order."""

    arch: str
    weights: str | None
    arch_reason: str
    img_size: int
    in_channels: int
    median_short_side: int
    grey: bool
    batch_size: int
    epochs: int
    freeze_epochs: int
    lr: float
    lr_backbone_ratio: float
    patience: int
    extend_max: int  # cycles callbacks.Extend may add; 0 where --epochs was given
    augment: str
    tta: str  # the views the CNN's predictions average (data.augment.test_views)
    intensity: dict[str, Any]
    window: list[float]
    mean: Any
    std: Any
    data_fingerprint: str
    precision: dict[str, str] | None = None  # Precision.record, once the device is known


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prepared:
    """Everything a fit needs that does not depend on which images it trains on."""

    cfg: TrainConfig
    resolved: Resolved
    catalog: fdata.Catalog
    splits: dict[str, np.ndarray]
    meta: dict[str, Any]
    store: fdata.ArrayStore | fdata.sources.FileStore
    position: np.ndarray  # catalog index → index in `store`
    device: torch.device
    precision: Precision
    skipped: list = field(default_factory=list)  # unreadable images left out (fdata.Skipped)

    def dataset(self, idx: np.ndarray) -> fdata.ImageDataset:
        r = self.resolved
        return fdata.ImageDataset(self.store, self.position[idx], self.catalog.labels[idx], r.img_size,
                                  r.in_channels)

    def ids(self, idx: np.ndarray) -> list[str]:
        return [self.catalog.ids[i] for i in idx]


def training_device(name: str) -> torch.device:
    """The device this process trains on (--device), the process joined to torchrun's group where torchrun
    started it. Settings of the whole process, made once by the commands that train (train-cnn, lr-find),
    before anything is decoded: on the CPU, glibc keeps the memory a step frees (keep_freed_memory)."""
    device = distributed.setup(resolve_device(name))
    if device.type == "cpu":
        keep_freed_memory()
    return device


def prepare(data: str, cfg: TrainConfig, device: torch.device,
            saved_splits: dict[str, list[str]] | None = None) -> Prepared:
    """Scan the data, decide the split, resolve automatic options and decode what fits into memory."""
    cfg.validate()
    seed_everything(cfg.seed)
    catalog = fdata.name_classes(fdata.scan(data, cfg.allow_outside), cfg.class_names)
    splits = fdata.assign_splits(catalog, cfg.seed, saved_splits)
    r = resolve(cfg, catalog, splits)
    precision = choose_precision(device, cfg.amp, r.arch)
    r = replace(r, precision=precision.record(device))
    # Every image is decoded once here: unreadable ones are dropped (or stop the run, --on-bad-image
    # error), and what fits stays in memory, so 2000-px scans are not decoded again every epoch.
    stores, splits, skipped = fdata.load_splits(catalog, splits, r.img_size, r.in_channels, cfg.on_bad_image)
    meta = {
        "arch": r.arch, "num_classes": len(catalog.class_names), "in_channels": r.in_channels,
        "mean": r.mean, "std": r.std, "window": r.window, "img_size": r.img_size,
        "class_names": catalog.class_names, "tta": r.tta,
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
    return Prepared(cfg, r, catalog, splits, meta, store, position, device, precision, skipped)


def resolve(cfg: TrainConfig, catalog: fdata.Catalog, splits: dict[str, np.ndarray]) -> Resolved:
    """Fill every automatic option from the training images (defaults.py's rules)."""
    train_idx = splits["train"]
    short_side, grey = fdata.describe_images(catalog.store, train_idx, cfg.seed)
    n_train = len(train_idx) + (len(splits["val"]) if cfg.folds > 1 else 0)
    arch, weights, why = ((cfg.arch, cfg.weights, "as given") if cfg.arch != "auto"
                          else defaults.auto_arch(short_side, n_train))
    entry = ARCHS[arch]
    if cfg.img_size is not None and cfg.img_size < entry.min_img_size:
        raise FeaturepipeError(f"--img-size {cfg.img_size}: too small; {arch} (chosen by --arch auto: {why}) needs "
                               f"at least {entry.min_img_size} px")
    in_channels = entry.in_channels(grey)
    img_size = cfg.img_size or defaults.auto_img_size(arch, short_side, weights is not None)
    # A re-run finds this sample in the disk cache, decoded by the first (data/cache.py).
    pixels = fdata.pixel_sample(fdata.cache.reuse(catalog.store, img_size, in_channels), train_idx, img_size,
                                in_channels, cfg.seed)
    intensity = fdata.intensity.measure(pixels)
    mean, std = entry.normalisation(weights)
    if mean is None:
        mean, std = fdata.channel_stats(pixels, intensity.window)
    batch_size = cfg.batch_size or defaults.auto_batch_size(n_train)
    epochs = cfg.epochs or defaults.auto_epochs(n_train, batch_size, weights is not None, grey)
    augment = fdata.resolve_augmentation(cfg.augment, grey)
    return Resolved(
        arch=arch, weights=weights, arch_reason=why,
        img_size=img_size, in_channels=in_channels, median_short_side=short_side, grey=grey,
        batch_size=batch_size, epochs=epochs,
        freeze_epochs=(cfg.freeze_epochs if cfg.freeze_epochs is not None
                       else defaults.auto_freeze_epochs(bool(weights))),
        lr=cfg.lr or defaults.auto_lr(bool(weights)),
        lr_backbone_ratio=cfg.lr_backbone_ratio or defaults.auto_lr_backbone_ratio(grey, n_train),
        patience=cfg.patience or defaults.auto_patience(epochs),
        extend_max=defaults.auto_extend_max(cfg.epochs),
        augment=augment,
        tta=defaults.auto_tta(augment, grey, n_train),
        intensity={"high": intensity.high, "levels": intensity.levels, "low_range": intensity.low_range,
                   "description": intensity.describe()},
        window=list(intensity.window),
        mean=mean, std=std, data_fingerprint=data_fingerprint(catalog),
    )
