"""Data: sources → catalog → splits → torch datasets."""

from featurepipe.data.augment import AUGMENTATIONS, augmentation, resolve_augmentation
from featurepipe.data import gpu
from featurepipe.data.cache import DiskCache
from featurepipe.data.dataset import (
    ImageDataset,
    channel_stats,
    decode_in_turn,
    describe_images,
    make_loader,
    pixel_sample,
)
from featurepipe.data.images import UnreadableImage
from featurepipe.data.load import BAD_IMAGE_POLICIES, Skipped, check_policy, load_splits, save_skipped
from featurepipe.data.sources import SPLITS, ArrayStore, Catalog, name_classes, scan
from featurepipe.data.splits import assign_splits, split_ids

__all__ = [
    "AUGMENTATIONS", "SPLITS", "ArrayStore", "Catalog", "ImageDataset", "assign_splits", "augmentation", "channel_stats",
    "DiskCache", "gpu",
    "decode_in_turn", "describe_images", "make_loader", "pixel_sample", "resolve_augmentation", "scan",
    "split_ids", "name_classes",
    "BAD_IMAGE_POLICIES", "Skipped", "UnreadableImage", "check_policy", "load_splits", "save_skipped",
]
