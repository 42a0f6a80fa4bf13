"""Data: sources → catalog → splits → torch datasets."""

from featurepipe.data.augment import AUGMENTATIONS, augmentation, resolve_augmentation
from featurepipe.data.dataset import (
    ImageDataset,
    channel_stats,
    describe_images,
    fits_in_cache,
    make_loader,
    preload,
)
from featurepipe.data.sources import SPLITS, Catalog, scan
from featurepipe.data.splits import assign_splits, split_ids

__all__ = [
    "AUGMENTATIONS", "SPLITS", "Catalog", "ImageDataset", "assign_splits", "augmentation", "channel_stats",
    "describe_images", "fits_in_cache", "make_loader", "preload", "resolve_augmentation", "scan", "split_ids",
]
