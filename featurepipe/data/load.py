"""Before training, every image is decoded once: into memory where its split fits, only checked where
it does not (extract and predict stream instead: ImageDataset's items carry the same verdict).
Unreadable images (empty, truncated, not an image at all, gone) are handled by one policy,
`--on-bad-image`: `skip` (the default) drops them from their split and lists them in the run's
`skipped.csv`; `error` stops at the first, naming it.

Dropping an image shifts nothing else: ids and labels are both looked up through catalog positions.
"""

from __future__ import annotations

import csv
import functools
import io
from collections import Counter
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from featurepipe import distributed
from featurepipe.data import cache, workers
from featurepipe.data.images import UnreadableImage
from featurepipe.data.sources import SPLITS, ArrayStore, Catalog, FileStore
from featurepipe.data.splits import check_splits
from featurepipe.errors import FeaturepipeError
from featurepipe.files import csv_cell, read_cell, write_text
from featurepipe.progress import log

BAD_IMAGE_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class Skipped:
    """One image left out, and why; a row of `skipped.csv`."""

    id: str
    split: str
    label: str
    reason: str


def check_policy(on_bad: str) -> None:
    if on_bad not in BAD_IMAGE_POLICIES:
        raise FeaturepipeError(f"--on-bad-image {on_bad}: choose {' or '.join(BAD_IMAGE_POLICIES)}")


def load_splits(catalog: Catalog, splits: dict[str, np.ndarray], size: int, channels: int, on_bad: str = "skip"):
    """Decode every image of every split once; returns (stores, splits, skipped).

    stores[split] is (store, positions) to build an ImageDataset from: the in-memory copy where the
    split fits in cache.memory_bytes(), else the disk cache (data/cache.py; the same store for every
    split, at catalog positions) or, with none, the source itself. The returned splits are the given ones less the
    unreadable images, which `skipped` lists. Every split must still hold every class.
    """
    check_policy(on_bad)
    stores, kept, skipped = {}, {}, []
    # A split too big for memory: every split goes to the disk cache, at catalog positions.
    disk = cache.for_archive(catalog.store, [len(splits[s]) for s in SPLITS], size, channels)
    for split in SPLITS:
        idx = splits[split]
        if catalog.store.in_memory:  # arrays always decode
            stores[split], kept[split] = (catalog.store, idx), idx
            continue
        # Decoding used to draw one number a split from torch's global generator (a DataLoader's base
        # seed), and only where the disk cache lacked a row, so a full cache trained another model. It
        # draws none now (workers.each_image); this draw, whatever the cache holds, keeps the stream,
        # and so the model, of a run that decodes everything.
        torch.empty((), dtype=torch.int64).random_()
        if disk is not None:
            images, failed = None, disk.fill(idx, stop_at_first=on_bad == "error",
                                             description=f"decode {split} to disk")
        else:
            keep = cache.fits_in_memory(len(idx), size, channels)
            images, failed = decode_all(catalog.store, idx, size, channels, keep=keep, stop_at_first=on_bad == "error",
                                        description=f"{'decode' if keep else 'check'} {split}")
        good = np.array([k for k in range(len(idx)) if k not in failed], dtype=np.int64)
        kept[split] = idx[good]
        stores[split] = (images, good) if images is not None else (disk or catalog.store, idx[good])
        skipped += [Skipped(catalog.ids[idx[k]], split, catalog.class_names[catalog.labels[idx[k]]], why)
                    for k, why in sorted(failed.items())]
    if skipped:
        check_splits(catalog, kept, why=f" once its {len(skipped)} unreadable image(s) are skipped")
    return stores, kept, skipped


def decode_all(store: ArrayStore | FileStore, indices: np.ndarray, size: int, channels: int, *, keep: bool = True,
               stop_at_first: bool = False, description: str = "decode") -> tuple[ArrayStore | None, dict[int, str]]:
    """Decode and resize the images at `indices` in worker processes.

    Returns the in-memory copy (row k is indices[k]; None unless `keep`) and {k: reason} for those
    that failed; with `stop_at_first` the first failure raises UnreadableImage instead.
    Under torchrun the processes of one machine each decode an interleaved share into one array they
    all map (distributed.node_shared_array): every image is decoded once per machine, held once, and
    every process sees all of them; the failures are pooled, so all processes agree on them.
    """
    share, shares = distributed.local_rank(), distributed.local_world_size()
    out = distributed.node_shared_array((len(indices), size, size, channels)) if keep else None
    if keep and out is None:  # no room to share: each process decodes and keeps everything
        out, share, shares = np.zeros((len(indices), size, size, channels), dtype=np.uint8), 0, 1
    mine = np.arange(share, len(indices), shares)
    failed: dict[int, str] = {}
    read = functools.partial(_read, size=size, channels=channels, keep=keep)
    for j, arr, why in workers.each_image(store, indices[mine], read, description):
        if why:
            failed[int(mine[j])] = why
            if stop_at_first:
                break  # the first failure of this share; the first of all is the least of those
        elif keep:
            out[mine[j]] = arr
    failed = dict(sorted(kv for part in distributed.all_gather_objects(failed) for kv in part.items()))
    if failed and stop_at_first:
        k = next(iter(failed))
        raise UnreadableImage(store.describe(int(indices[k])), failed[k])
    return (ArrayStore(out, f"cached {getattr(store, 'name', 'images')}") if keep else None), failed


def _read(store: ArrayStore | FileStore, i: int, size: int, channels: int, keep: bool) -> np.ndarray | None:
    arr = store.read(i, size, channels)
    return arr if keep else None  # a check only: no need to ship the pixels back from the worker


def skipped_ids(path: Path, split: str) -> set[str]:
    """The ids of `split` that save_skipped listed in `path`; none where there is no list."""
    if not path.is_file():
        return set()
    with path.open(newline="", encoding="utf-8") as f:
        return {read_cell(row["id"]) for row in csv.DictReader(f) if row.get("split") == split}


def save_skipped(path: Path, skipped: list[Skipped]) -> None:
    """Write the list (a header alone when nothing was skipped, so no stale list survives a rerun) and
    warn once with the count."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([f.name for f in fields(Skipped)])
    writer.writerows([csv_cell(str(v)) for v in astuple(s)] for s in skipped)
    write_text(path, buf.getvalue())
    if skipped:
        per_split = ", ".join(f"{split} {n}" for split, n in Counter(s.split for s in skipped).items() if split)
        log(f"warning: skipped {len(skipped)} unreadable image(s)" + (f" ({per_split})" if per_split else "")
            + f", e.g. {skipped[0].id}: "
            f"{skipped[0].reason}; all listed in {path}")
