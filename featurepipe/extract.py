"""The trained CNN as a batched feature extractor, and the HDF5 schema of `features.h5`.

Schema (the one place it is defined):
  /<split>/features  float32 (N, D)   the embedding (`layer` attribute says which)
  /<split>/labels    int64   (N,)     index into class_names
  /<split>/ids       str     (N,)     image ids as in the run's splits.json
  attrs: class_names, arch, layer, tta, checkpoint (fingerprint), img_size, source, schema_version
  (`layer` and `tta` as in models.embedding; files without `tta` were written without TTA)
Rows are written batch by batch into chunked datasets, so memory does not grow with the data set,
and the file only appears under its real name once complete. Until then it is `<name>.partial`, whose
groups carry a done-index (`done`, rows written and flushed): a killed extract re-run with the same
checkpoint and images resumes after the last complete batch and yields the same features.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe import distributed
from featurepipe.device import autocast, resolve_device, to_device
from featurepipe.errors import FeaturepipeError
from featurepipe.models import LAYERS, TTA, fingerprint, load_checkpoint
from featurepipe.models.embedding import check_choice
from featurepipe.progress import log, progress_bar
from featurepipe.runs import load_config, partial_path, read_json, require, run_paths, skipped_beside

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20


@dataclass
class FeatureSplit:
    features: np.ndarray | h5py.Dataset  # a Dataset (from open_split) reads only the rows sliced from it
    labels: np.ndarray
    ids: list[str]


def extract(run: str | Path, batch_size: int = 256, data: str | None = None, out: str | Path | None = None,
            device: str = "auto", amp: bool = True, layer: str = "penultimate", tta: str = "none",
            on_bad_image: str = "skip") -> Path:
    """Embed every split of the run's data (or of another source, with `data` and `out`) into HDF5.

    `on_bad_image` applies to another source; the run's own images were all readable when the CNN was
    trained, so one that is not now stops the command (the data changed).
    """
    paths = run_paths(run)
    cfg = load_config(paths)
    require(paths.checkpoint, "trained CNN", f"run featurepipe train-cnn --out {paths.root} first")
    if (data is None) != (out is None):
        raise FeaturepipeError("--data and --out go together: embed another source into the file --out names")
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size {batch_size}: must be at least 1")
    check_choice("--layer", layer, LAYERS)
    check_choice("--tta", tta, TTA)
    fdata.check_policy(on_bad_image)
    dev = distributed.setup(resolve_device(device))
    net, meta = load_checkpoint(paths.checkpoint, dev)
    net = net.to(memory_format=torch.channels_last)
    class_names = meta["class_names"]
    dim = net.embed_dim(layer, meta["img_size"])

    if data is None:
        catalog = fdata.scan(cfg["data"]["source"])
        if catalog.class_names != class_names:
            raise FeaturepipeError(f"{cfg['data']['source']}: its classes changed since training; train a new run")
        splits = fdata.assign_splits(catalog, cfg["train"]["seed"], read_json(paths.splits))
        target = paths.features
        stores, splits, _ = fdata.load_splits(catalog, splits, meta["img_size"], meta["in_channels"], "error")
    else:
        catalog = _relabel(fdata.scan(data), class_names)
        splits = fdata.assign_splits(catalog, cfg["train"]["seed"])
        target = Path(out)
        stores, splits, skipped = fdata.load_splits(catalog, splits, meta["img_size"], meta["in_channels"],
                                                    on_bad_image)
        fdata.save_skipped(skipped_beside(target), skipped)

    attrs = {
        "class_names": json.dumps(class_names), "arch": meta["arch"], "layer": layer, "tta": tta,
        "checkpoint": fingerprint(paths.checkpoint), "img_size": meta["img_size"], "source": catalog.source,
        "schema_version": SCHEMA_VERSION,
    }
    pin = dev.type == "cuda"
    ids = {split: [catalog.ids[i] for i in splits[split]] for split in fdata.SPLITS}
    partial = partial_path(target)
    # Under torchrun every rank embeds an interleaved shard of each split and rank 0 alone writes the
    # one file, in the same row order as a single process would.
    rank, world = distributed.rank(), distributed.world_size()
    h5 = _open_partial(partial, attrs, ids, dim) if rank == 0 else None
    try:
        for split in fdata.SPLITS:
            store, positions = stores[split]
            done = distributed.broadcast_object(int(h5[split].attrs["done"]) if h5 is not None else 0)
            shard = slice(done + rank, None, world)
            ds = fdata.ImageDataset(store, positions[shard], catalog.labels[splits[split]][shard], meta["img_size"],
                                    meta["in_channels"])
            loader = fdata.make_loader(ds, batch_size, pin_memory=pin)
            _write_split(h5, split, net, loader, dev, amp, layer, tta, total=len(positions), done=done)
        if h5 is not None:
            for split in fdata.SPLITS:
                del h5[split].attrs["done"]
    finally:
        if h5 is not None:
            h5.close()
    if rank == 0:
        os.replace(partial, target)
    distributed.barrier()
    log(f"features of {sum(len(v) for v in splits.values())} images ({dim}-d, {layer}, tta {tta}) → {target}")
    return target


def _open_partial(path: Path, attrs: dict[str, Any], ids: dict[str, list[str]], dim: int) -> h5py.File:
    """The unfinished file, continued where it stopped if it was being written from the same checkpoint,
    options and images; otherwise a new one with every split's ids and `done` = 0."""
    if path.exists():
        try:
            h5 = h5py.File(path, "r+")
        except OSError as e:  # killed mid-flush: its index cannot be trusted
            log(f"{path}: unreadable ({e}); starting over")
        else:
            if _continues(h5, attrs, ids, dim):
                log(f"resuming {path}: " + ", ".join(f"{s} {h5[s].attrs['done']}/{len(ids[s])}" for s in ids))
                return h5
            h5.close()
            log(f"{path}: left by an extract of other images or another checkpoint; starting over")
    try:
        h5 = h5py.File(path, "w")
    except OSError as e:
        raise FeaturepipeError(f"{path}: cannot be written ({e}); is another featurepipe extract writing it?") from None
    h5.attrs.update(attrs)
    for split, split_ids in ids.items():
        n = len(split_ids)
        group = h5.create_group(split)
        rows = max(1, min(n, CHUNK_BYTES // (4 * dim)))
        group.create_dataset("features", shape=(n, dim), dtype="float32", chunks=(rows, dim) if n else None)
        group.create_dataset("labels", shape=(n,), dtype="int64")
        group.create_dataset("ids", data=np.array(split_ids, dtype=object), dtype=h5py.string_dtype())
        group.attrs["done"] = 0
    h5.flush()
    return h5


def _continues(h5: h5py.File, attrs: dict[str, Any], ids: dict[str, list[str]], dim: int) -> bool:
    try:
        return (
            all(k in h5.attrs and np.array_equal(h5.attrs[k], v) for k, v in attrs.items())
            and all(h5[s]["features"].shape == (len(v), dim) and "done" in h5[s].attrs
                    and list(h5[s]["ids"].asstr()[:]) == v for s, v in ids.items())
        )
    except (KeyError, OSError):
        return False


def _relabel(catalog: fdata.Catalog, class_names: list[str]) -> fdata.Catalog:
    unknown = sorted(set(catalog.class_names) - set(class_names))
    if unknown:
        raise FeaturepipeError(
            f"{catalog.source}: class(es) {', '.join(unknown)} are not among the run's classes ({', '.join(class_names)})"
        )
    index = np.array([class_names.index(c) for c in catalog.class_names])
    catalog.labels, catalog.class_names = index[catalog.labels], list(class_names)
    return catalog


@torch.inference_mode()
def _write_split(h5: h5py.File | None, split: str, net, loader, device, amp: bool, layer: str, tta: str,
                 total: int, done: int) -> None:
    """Rows from the done-index on; the index moves only once a batch is flushed to the file.

    With several ranks each loader holds the rows done + rank, done + rank + world, ...; every rank
    takes the same number of steps (an empty batch where its shard has run out), and rank 0 puts
    the gathered rows back in order.
    """
    world = distributed.world_size()
    steps = math.ceil(math.ceil((total - done) / world) / max(1, loader.batch_size))
    batches = iter(loader)
    net.eval()
    start = done
    with progress_bar() as bar:
        task = bar.add_task(f"extract {split}", total=total, completed=done, info="")
        for _ in range(steps):
            x, y, _ = next(batches, (None, torch.zeros(0, dtype=torch.int64), None))
            if x is None:
                f = np.zeros((0, 0), dtype=np.float32)
            else:
                with autocast(device, amp):
                    f = net.embed(to_device(x, device), layer, tta).float().cpu().numpy()
            parts = distributed.all_gather_objects((f, y.numpy()))
            n = sum(len(p[1]) for p in parts)
            if h5 is not None:
                rows, labels = np.empty((n, max(p[0].shape[1] for p in parts)), np.float32), np.empty(n, np.int64)
                for r, (fr, yr) in enumerate(parts):  # rank r's k-th row is row k * world + r of this step
                    rows[r::world][:len(yr)], labels[r::world][:len(yr)] = fr, yr
                group = h5[split]
                group["features"][start:start + n] = rows
                group["labels"][start:start + n] = labels
                h5.flush()
                group.attrs["done"] = start + n
                h5.flush()
            start += n
            bar.advance(task, n)


def read_attrs(path: Path) -> dict[str, Any]:
    with _open(path) as h5:
        attrs = dict(h5.attrs)
    attrs["class_names"] = json.loads(attrs["class_names"])
    attrs.setdefault("tta", "none")  # written before TTA existed
    return attrs


def read_split(path: Path, split: str) -> FeatureSplit:
    with open_split(path, split) as s:
        return FeatureSplit(s.features[:], s.labels, s.ids)


@contextlib.contextmanager
def open_split(path: Path, split: str) -> Iterator[FeatureSplit]:
    """A split whose features stay on disk, for data larger than memory; labels and ids are read."""
    with _open(path) as h5:
        if split not in h5:
            raise FeaturepipeError(f"{path}: has no '{split}' split; re-run featurepipe extract")
        g = h5[split]
        yield FeatureSplit(g["features"], g["labels"][:], list(g["ids"].asstr()[:]))


def _open(path: Path) -> h5py.File:
    require(Path(path), "features file", "run featurepipe extract first")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise FeaturepipeError(f"{path}: not a readable HDF5 file ({e}); re-run featurepipe extract") from None
