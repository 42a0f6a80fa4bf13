"""Torch datasets and loaders over a Catalog, the in-memory cache, augmentation and data statistics.

Loaders yield uint8 (N, C, S, S) batches: a quarter of float32's bytes to copy, and the model
normalises on its own device (see models.Net).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from featurepipe.data import intensity
from featurepipe.data.images import UnreadableImage
from featurepipe.data.intensity import FULL_RANGE
from featurepipe.data.sources import ArrayStore, FileStore
from featurepipe.data.workers import num_workers
from featurepipe.errors import FeaturepipeError

# Decoded, resized images of a split up to cache.memory_bytes() (4 GiB) stay in memory: 2000-px scans
# decode in tens of milliseconds each, and training reads every image once per epoch. Larger splits
# go to the disk cache (data/cache.py).


class ImageDataset(Dataset):
    """Decoded, resized uint8 images; augmentation happens later, on whole batches (data/augment.py).

    An item is (image, label, k, why): `why` is "" or the reason image k cannot be read (its image is
    then blank). Failures travel as data because an exception raised in a loader worker reaches the
    main process as a multi-line traceback; `check` turns them into the one-line error.
    """

    def __init__(self, store: ArrayStore | FileStore, indices: np.ndarray, labels: np.ndarray,
                 size: int, channels: int) -> None:
        self.store, self.indices, self.labels = store, np.asarray(indices), np.asarray(labels)
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        try:
            arr = self.store.read(int(self.indices[k]), self.size, self.channels)
        except UnreadableImage as e:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), int(self.labels[k]), k, \
                e.reason or str(e)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return x, int(self.labels[k]), k, ""

    def __getitems__(self, ks: list[int]):
        """A loader's whole batch: one gather where the store holds the images ready at this size (the
        training cache, a 28-px .npz), instead of an item, a tensor and a stack per image: PneumoniaMNIST
        trained 5 % faster on 2 cores (1313 -> 1378 images/s), to the same weights. The batch comes out
        channels_last, as the model takes it."""
        images = getattr(self.store, "images", None)
        if images is None or images.shape[1:] != (self.size, self.size, self.channels):
            return [self[k] for k in ks]
        ks = np.asarray(ks, dtype=np.int64)
        rows = self.indices[ks]
        if hasattr(self.store, "ready") and not self.store.ready(rows):  # a disk cache still lacking some
            return [self[k] for k in ks.tolist()]
        x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2)
        return x, torch.from_numpy(self.labels[ks].astype(np.int64)), torch.from_numpy(ks), ("",) * len(ks)

    def check(self, k: torch.Tensor, why: list[str]) -> None:
        """Stop at the batch's first unreadable image (k and why as the loader yields them), naming its file."""
        for j, w in zip(k.tolist(), why):
            if w:
                raise UnreadableImage(self.store.describe(int(self.indices[j])), w)


def make_loader(ds: ImageDataset, batch_size: int | None, *, shuffle: bool = False, seed: int = 0,
                pin_memory: bool = False, drop_last: bool = False, sampler=None, once: bool = False,
                batches: list[list[int]] | None = None) -> DataLoader:
    """`once`: a single pass (extract, predict), whose workers go as soon as its iterator does.
    `batches`: the exact batches (lists of item indices) of a single pass, instead of batch_size."""
    workers = num_workers(ds.store)
    order = {"batch_sampler": batches} if batches is not None else {
        "batch_size": batch_size, "shuffle": shuffle and sampler is None, "sampler": sampler, "drop_last": drop_last}
    return DataLoader(
        ds, **order, num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0 and not once and batches is None, worker_init_fn=_seed_worker,
    )


def _collate(batch):
    """Items stacked as (N, H, W, C), as decoded, and viewed as (N, C, H, W): channels_last, the layout
    the model takes, with no transposing copy either way (4 ms of a 64-image 224-px batch)."""
    if isinstance(batch, tuple):  # made whole by __getitems__
        return batch
    x = torch.stack([item[0].permute(1, 2, 0) for item in batch]).permute(0, 3, 1, 2)
    return x, *default_collate([item[1:] for item in batch])


def decode_in_turn(ds: ImageDataset, batches: list[list[int]]) -> Iterator:
    """A single pass's batches (as make_loader's with `batches`), each decoded by threads of this
    process just before it is used: for a model on the CPU.

    Loader workers decoding beside such a model take cores its threads need, and a parallel op waits
    for its slowest thread: on resnet18 at 224 px, 2 s of decoding slowed a 2-core extract by 4 s
    (from JPEGs 90 images/s, from memory 110). Decoded in turn, on all cores, it costs its own time
    over the cores. PIL releases the GIL while it decodes and resizes; a pool of processes in turn
    was slower (3200 JPEGs of 512 px: 1.77 s against 1.46 s), shipping the pixels back costing more.
    """
    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        for batch in batches:
            yield _collate(list(pool.map(ds.__getitem__, batch)))


def _seed_worker(worker_id: int) -> None:
    # Augmentation in workers must be reproducible too: derive each worker's seeds from torch's.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


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


def pixel_sample(store: ArrayStore | FileStore, indices: np.ndarray, size: int, channels: int, seed: int,
                 k: int = 1000) -> np.ndarray:
    """Up to k of the images at `indices`, decoded as training will see them: uint8 (n, S, S, C)."""
    picks = indices[sample_positions(len(indices), k, seed)]
    return np.stack(_readable(store, lambda i: store.read(i, size, channels), picks))


def channel_stats(pixels: np.ndarray, window: tuple[float, float] = FULL_RANGE) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, on the 0..1 scale the model sees (after its intensity window), of a
    `pixel_sample` of the training images."""
    x = intensity.apply(pixels, window)
    mean = x.mean(axis=(0, 1, 2))
    std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return mean.round(6).tolist(), std.round(6).tolist()
