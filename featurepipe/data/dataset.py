"""Torch datasets and loaders over a Catalog, the in-memory cache, augmentation and data statistics.

Loaders yield uint8 (N, C, S, S) batches: a quarter of float32's bytes to copy, and the model
normalises on its own device (see models.Net).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featurepipe.data.images import UnreadableImage
from featurepipe.data.sources import ArrayStore, FileStore
from featurepipe.errors import FeaturepipeError

# Decoded, resized images of a data set up to this size stay in memory: 2000-px scans decode in
# tens of milliseconds each, and training reads every image once per epoch.
CACHE_BYTES = 4 * 1024**3


class ImageDataset(Dataset):
    """Decoded, resized uint8 images; augmentation happens later, on whole batches (data/augment.py)."""

    def __init__(self, store: ArrayStore | FileStore, indices: np.ndarray, labels: np.ndarray,
                 size: int | None, channels: int) -> None:
        self.store, self.indices, self.labels = store, np.asarray(indices), np.asarray(labels)
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        arr = self.store.read(int(self.indices[k]), self.size, self.channels)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return x, int(self.labels[k]), k


def num_workers(store: ArrayStore | FileStore) -> int:
    """Decoding files needs worker processes; arrays in memory are faster without the IPC."""
    if store.in_memory:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(ds: ImageDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                pin_memory: bool = False, drop_last: bool = False, sampler=None) -> DataLoader:
    workers = num_workers(ds.store)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=drop_last, generator=generator, persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
    )


def _seed_worker(worker_id: int) -> None:
    # Augmentation in workers must be reproducible too: derive each worker's seeds from torch's.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def fits_in_cache(n: int, size: int, channels: int) -> bool:
    return n * size * size * channels <= CACHE_BYTES


def sample_positions(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, k), replace=False))


def describe_images(store: ArrayStore | FileStore, indices: np.ndarray, seed: int, k: int = 200) -> tuple[int, bool]:
    """Median short side and whether most images are grey, from a sample of up to k headers."""
    picks = indices[sample_positions(len(indices), k, seed)]
    sizes, grey = zip(*_readable(store, store.peek, picks))
    return int(np.median([min(s) for s in sizes])), float(np.mean(grey)) >= 0.5


def _readable(store: ArrayStore | FileStore, read, picks: np.ndarray) -> list:
    """read(i) for each sampled image, leaving out unreadable ones: the full decode pass reports those."""
    out = []
    for i in picks:
        try:
            out.append(read(int(i)))
        except UnreadableImage:
            pass
    if not out:
        raise FeaturepipeError(f"{store.describe(int(picks[0]))}: this and every other sampled image ({len(picks)}) "
                               "are unreadable; featurepipe data inspect says why")
    return out


def channel_stats(store: ArrayStore | FileStore, indices: np.ndarray, size: int, channels: int,
                  seed: int, k: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) of a sample of the training images."""
    picks = indices[sample_positions(len(indices), k, seed)]
    x = np.stack(_readable(store, lambda i: store.read(i, size, channels), picks)).astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return mean.round(6).tolist(), std.round(6).tolist()
