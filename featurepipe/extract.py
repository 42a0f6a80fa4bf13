"""The trained CNN as a batched feature extractor, and the HDF5 schema of `features.h5`.

Schema (the one place it is defined):
  /<split>/features  float32 (N, D)   the embedding (`layer` attribute says which)
  /<split>/labels    int64   (N,)     index into class_names
  /<split>/ids       str     (N,)     image ids as in the run's splits.json
  attrs: class_names, arch, layer, tta, checkpoint (fingerprint), img_size, source, schema_version,
  precision (of the forward pass: fp32, bf16 or fp16)
  (`layer` and `tta` as in models.embedding; files without `tta` were written without TTA)
Rows are written batch by batch into chunked datasets, so memory does not grow with the data set,
and the file only appears under its real name once complete. Until then it is `<name>.partial`, whose
groups carry a done-index (`done` images embedded, `rows` written and flushed, the `skipped` ones):
a killed extract re-run with the same checkpoint and images resumes after the last complete batch
and yields the same features. Unreadable images skipped on the way leave no row: the ids are written
up front, so the split's ids are rewritten and its datasets cut to length once it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe import distributed
from featurepipe.data.fingerprint import check_same_data
from featurepipe.device import autocast, choose_precision, images_per_pass, in_passes, resolve_device, to_device
from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.models import LAYERS, TTA, create_model, fingerprint, load_checkpoint
from featurepipe.models.embedding import check_choice
from featurepipe.progress import log, progress_bar
from featurepipe.run_config import RunConfig
from featurepipe.runs import (WRITE_ERRNOS, cannot_write, check_output, partial_path, read_json, require, run_paths,
                              skipped_beside)

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20
# h5py's own filters, readable wherever h5py is: gzip packs tighter, lzf is faster.
COMPRESSION = ("none", "gzip", "lzf")


def hdf5_filters(compression: str) -> dict[str, Any]:
    """create_dataset's arguments for `compression`; byte shuffling first helps floats compress."""
    return {} if compression == "none" else {"compression": compression, "shuffle": True}


@dataclass
class FeatureSplit:
    features: np.ndarray | h5py.Dataset  # a Dataset (from open_split) reads only the rows sliced from it
    labels: np.ndarray
    ids: list[str]


def extract(run: str | Path, batch_size: int = 256, data: str | None = None, out: str | Path | None = None,
            device: str = "auto", amp: bool | None = None, layer: str = "penultimate", tta: str = "none",
            on_bad_image: str = "skip", compression: str = "none", allow_outside: bool = False,
            overwrite: bool = False) -> Path:
    """Embed every split of the run's data (or of another source, with `data` and `out`) into HDF5.

    Images stream from their files straight into the model, each decoded once and none kept.
    `compression` (COMPRESSION) applies to the features and labels; readers need nothing to know it.
    `on_bad_image` applies to another source; the run's own images were all readable when the CNN was
    trained, so one that is not now stops the command (the data changed).
    Where the CNN started from pretrained weights, the run's own images are embedded a second time by
    the pretrained backbone as it was before fine-tuning (`features.frozen.h5`): the frozen-features
    arm that fit-heads also fits, to tell what fine-tuning added.
    """
    kwargs = dict(batch_size=batch_size, data=data, out=out, device=device, amp=amp, layer=layer, tta=tta,
                  on_bad_image=on_bad_image, compression=compression, allow_outside=allow_outside,
                  overwrite=overwrite)
    target = _extract(run, **kwargs)
    if data is None and RunConfig.load(run_paths(run)).weights is not None:
        _extract(run, **kwargs, frozen=True)
    return target


def _extract(run: str | Path, batch_size: int, data: str | None, out: str | Path | None, device: str,
             amp: bool | None, layer: str, tta: str, on_bad_image: str, compression: str, allow_outside: bool,
             overwrite: bool, frozen: bool = False) -> Path:
    """One pass of `extract`: the run's CNN, or with `frozen` its pretrained backbone untouched by training."""
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    require(paths.checkpoint, "trained CNN", f"run featurepipe train-cnn --out {paths.root} first")
    if (data is None) != (out is None):
        raise FeaturepipeError("--data and --out go together: embed another source into the file --out names")
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size {batch_size}: must be at least 1")
    check_choice("--layer", layer, LAYERS)
    check_choice("--tta", tta, TTA)
    check_choice("--compression", compression, COMPRESSION)
    fdata.check_policy(on_bad_image)
    if out is not None:
        check_output(Path(out), "--out", overwrite=overwrite, beside=(skipped_beside(Path(out)),))
    dev = distributed.setup(resolve_device(device))
    net, meta = load_checkpoint(paths.checkpoint, dev)
    if frozen:  # the same input pipeline (size, window, normalisation), the weights before any training
        net = create_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["mean"], meta["std"],
                           cfg.weights, window=tuple(meta["window"])).to(dev).eval()
    net = net.to(memory_format=torch.channels_last)
    class_names = meta["class_names"]
    dim = net.embed_dim(layer, meta["img_size"])
    precision = choose_precision(dev, amp)
    per_pass = images_per_pass(net, meta["img_size"], precision.forward)

    def embed(x: torch.Tensor) -> np.ndarray:
        with autocast(dev, precision.forward):
            f = in_passes(lambda part: net.embed(part, layer, tta), to_device(x, dev), per_pass)
        return f.float().cpu().numpy()

    if data is None:
        catalog = cfg.train.scan(cfg.data.source)
        check_same_data(cfg.sections, catalog, f"extract --run {paths.root}")
        if catalog.class_names != class_names:
            raise FeaturepipeError(f"{cfg.data.source}: its classes changed since training; train a new run")
        splits = fdata.assign_splits(catalog, cfg.seed, read_json(paths.splits))
        target, policy = paths.frozen_features if frozen else paths.features, "error"
    else:
        catalog = _relabel(fdata.scan(data, allow_outside), class_names)
        splits = fdata.assign_splits(catalog, cfg.seed)
        target, policy = Path(out), on_bad_image

    attrs = {
        "class_names": json.dumps(class_names), "arch": meta["arch"], "layer": layer, "tta": tta,
        "checkpoint": fingerprint(paths.checkpoint), "img_size": meta["img_size"], "source": catalog.source,
        "schema_version": SCHEMA_VERSION, "precision": precision.record(dev)["forward"],
        **({"frozen": cfg.weights} if frozen else {}),
    }
    pin = dev.type == "cuda"
    ids = {split: [catalog.ids[i] for i in splits[split]] for split in fdata.SPLITS}
    partial = partial_path(target)
    # Under torchrun every rank embeds an interleaved shard of each split and rank 0 alone writes the
    # one file, in the same row order as a single process would.
    rank, world = distributed.rank(), distributed.world_size()
    if rank == 0:
        _reserve(partial, sum(len(v) for v in ids.values()) * (4 * dim + 8 + 64) + (1 << 20))
    with cannot_write(partial):
        h5 = _open_partial(partial, attrs, ids, dim, compression) if rank == 0 else None
    progress = distributed.broadcast_object({s: _progress(h5[s]) for s in fdata.SPLITS} if h5 is not None else None)
    # One pass over all splits. A model on the CPU decodes in turn with its batches (decode_in_turn says
    # why); otherwise loader workers decode beside it, forked before the first forward pass: forked later,
    # they would share this process's activation memory copy-on-write, and every page the model wrote
    # again would be copied (measured on resnet18 at 224 px: 5 s of page faults in a 24 s extract).
    shards = {s: np.arange(progress[s].done + rank, len(splits[s]), world) for s in fdata.SPLITS}
    position = np.concatenate(list(shards.values()))  # item k of the loader is image position[k] of its split
    items = np.concatenate([splits[s][shards[s]] for s in fdata.SPLITS])
    catalog.store = fdata.cache.reuse(catalog.store, meta["img_size"], meta["in_channels"])  # decoded by train-cnn
    ds = fdata.ImageDataset(catalog.store, items, catalog.labels[items], meta["img_size"], meta["in_channels"])
    starts = np.cumsum([0] + [len(v) for v in shards.values()])
    batches = [list(range(i, min(i + batch_size, end))) for start, end in zip(starts, starts[1:])
               for i in range(start, end, batch_size)]
    if dev.type == "cpu" and not catalog.store.in_memory:
        loader = fdata.decode_in_turn(ds, batches)
    elif dev.type == "cuda" and fdata.gpu.jpeg_archive(catalog.store):  # nvJPEG, the rest on the CPU (data/gpu.py)
        loader = fdata.gpu.decode_on_device(ds, batches, dev)
    else:
        loader = iter(fdata.gpu.on_device(fdata.make_loader(ds, None, pin_memory=pin, batches=batches), dev))
    skipped: list[fdata.Skipped] = []
    unreadable = None
    try:
        with _damaged_if_failed(partial, lambda: h5):
            for split, start, end in zip(fdata.SPLITS, starts, starts[1:]):
                idx = splits[split]
                unreadable = _write_split(h5, split, embed, loader, math.ceil((end - start) / batch_size), position,
                                          len(idx), batch_size, progress[split], policy)
                if unreadable:
                    break
                skipped += [fdata.Skipped(ids[split][p], split, class_names[catalog.labels[idx[p]]], why)
                            for p, why in progress[split].skipped]
            else:
                if h5 is not None:
                    for split in fdata.SPLITS:
                        _finish(h5[split])
    finally:
        del loader  # its workers, forked while the file was open, hold the file's lock until they exit
        if h5 is not None:
            h5.close()
    if unreadable:  # `split` is the one the loop stopped in
        p, why = unreadable
        raise fdata.UnreadableImage(catalog.store.describe(int(splits[split][p])), why)
    if rank == 0:
        with cannot_write(target):
            os.replace(partial, target)
    if data is not None:
        fdata.save_skipped(skipped_beside(target), skipped)
    distributed.barrier()
    n = sum(len(v) for v in splits.values()) - len(skipped)
    log(f"{'frozen pretrained ' if frozen else ''}features of {n} images ({dim}-d, {layer}, tta {tta}) → {target}; "
        f"{precision.describe(dev, training=False)}")
    return target


def _reserve(partial: Path, nbytes: int) -> None:
    """Claim the space the features need (uncompressed) once, and give it back, before HDF5 writes any.

    A full disk in the middle of the HDF5 library's writes surfaces as errors it cannot report (then a
    crash, and a damaged file); here it is one line before any work. Another program can still fill
    the disk later: then `_damaged_if_failed` and the checks on resuming (`_continues`) take over."""
    need = nbytes - (partial.stat().st_size if partial.exists() else 0)
    probe = partial.with_name(f".{partial.name}.space")
    try:
        with cannot_write(partial):
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if need > 0:
                    os.posix_fallocate(fd, 0, need)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                    raise
            finally:
                os.close(fd)
    finally:
        probe.unlink(missing_ok=True)


@contextlib.contextmanager
def _damaged_if_failed(partial: Path, h5) -> Iterator[None]:
    """A write that fails (disk full, quota) may leave the HDF5 file's own index half-updated: drop the
    partial file, so the next run starts it over instead of trusting it, and say so in one line."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # h5py reports a failed write as either
        message = str(e)
        if not (getattr(e, "errno", None) in WRITE_ERRNOS or "write failed" in message or "Can't write" in message):
            raise  # not a write (a model or loader error): the partial file is intact
        file = h5()
        if file is not None:
            with contextlib.suppress(Exception):
                file.close()
        partial.unlink(missing_ok=True)
        why = os.strerror(e.errno) if getattr(e, "errno", None) else first_line(e, 160)
        raise FeaturepipeError(f"{partial}: cannot write ({why}); free space and re-run extract "
                               "(it starts this file over)") from None


@dataclass
class _Progress:
    """How far a split of the partial file is: `done` images consumed, `rows` written (the readable
    ones among them, in order), and (position, reason) of each one skipped."""

    done: int = 0
    rows: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


_PROGRESS_ATTRS = tuple(f.name for f in fields(_Progress))


def _progress(group: h5py.Group) -> _Progress:
    return _Progress(int(group.attrs["done"]), int(group.attrs["rows"]),
                     [(int(p), str(w)) for p, w in json.loads(group.attrs["skipped"])])


def _save_progress(group: h5py.Group, progress: _Progress) -> None:
    group.attrs["rows"] = progress.rows
    group.attrs["skipped"] = json.dumps(progress.skipped)
    group.attrs["done"] = progress.done


def _finish(group: h5py.Group) -> None:
    """Drop the skipped images' rows from the split (its ids were written up front) and its index."""
    progress = _progress(group)
    if progress.skipped:
        gone = {p for p, _ in progress.skipped}
        kept = [i for p, i in enumerate(group["ids"].asstr()[:]) if p not in gone]
        group["features"].resize(progress.rows, axis=0)
        group["labels"].resize(progress.rows, axis=0)
        del group["ids"]
        group.create_dataset("ids", data=np.array(kept, dtype=object), dtype=h5py.string_dtype())
    for key in _PROGRESS_ATTRS:
        del group.attrs[key]


def _open_partial(path: Path, attrs: dict[str, Any], ids: dict[str, list[str]], dim: int,
                  compression: str) -> h5py.File:
    """The unfinished file, continued where it stopped if it was being written from the same checkpoint,
    options and images; otherwise a new one with every split's ids and nothing done."""
    filters = hdf5_filters(compression)
    if path.exists():
        try:
            h5 = h5py.File(path, "r+")
        except OSError as e:  # killed mid-flush: its index cannot be trusted
            log(f"{path}: unreadable ({e}); starting over")
        else:
            if _continues(h5, attrs, ids, dim, filters.get("compression")):
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
        # Chunked and resizable: rows of skipped images are cut off the end once the split is done.
        rows = max(1, min(n, CHUNK_BYTES // (4 * dim)))
        group.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype="float32", chunks=(rows, dim),
                             **filters)
        group.create_dataset("labels", shape=(n,), maxshape=(None,), dtype="int64", chunks=(max(1, min(n, 1 << 16)),),
                             **filters)
        group.create_dataset("ids", data=np.array(split_ids, dtype=object), dtype=h5py.string_dtype())
        _save_progress(group, _Progress())
    h5.flush()
    return h5


def _continues(h5: h5py.File, attrs: dict[str, Any], ids: dict[str, list[str]], dim: int,
               compression: str | None) -> bool:
    try:
        return (
            all(k in h5.attrs and np.array_equal(h5.attrs[k], v) for k, v in attrs.items())
            and all(h5[s]["features"].shape == (len(v), dim) and h5[s]["features"].compression == compression
                    and all(k in h5[s].attrs for k in _PROGRESS_ATTRS)
                    and list(h5[s]["ids"].asstr()[:]) == v and _last_rows_read(h5[s]) for s, v in ids.items())
        )
    except Exception:  # a damaged file raises anything from KeyError to "addr overflow": start it over
        return False


def _last_rows_read(group: h5py.Group) -> bool:
    """The rows the index says are written can be read back (a file cut short by a full disk cannot)."""
    rows = int(group.attrs["rows"])
    if not 0 <= rows <= len(group["features"]) or int(group.attrs["done"]) > len(group["ids"]):
        return False
    group["features"][max(0, rows - 1):rows]
    group["labels"][max(0, rows - 1):rows]
    return True


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
def _write_split(h5: h5py.File | None, split: str, embed, batches, n_batches: int, position: np.ndarray, total: int,
                 batch_size: int, progress: _Progress, policy: str) -> tuple[int, str] | None:
    """Embed the split's images from `progress` on; the index moves only once a batch is flushed to the file.

    `embed` turns a batch into its features. This rank takes its `n_batches` batches of the split from
    `batches`. Under torchrun each rank holds the images done + rank, done + rank + world, ...; every
    rank takes the same number of steps (an empty one where its shard has run out), all ranks see every
    rank's batch (so all stop together at an unreadable image under the `error` policy), and rank 0
    writes the readable rows in image order.
    Returns (position, reason) of the image that stops the command, else None.
    """
    world = distributed.world_size()
    steps = math.ceil(math.ceil((total - progress.done) / world) / batch_size)
    with progress_bar() as bar:
        task = bar.add_task(f"extract {split}", total=total, completed=progress.done, info="")
        for step in range(steps):
            part = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), [])
            if step < n_batches:
                x, y, k, why = next(batches)
                part = (embed(x), y.numpy(), position[k.numpy()], list(why))
            parts = [p for p in distributed.all_gather_objects(part) if len(p[1])]
            positions = np.concatenate([p[2] for p in parts])
            order = np.argsort(positions, kind="stable")
            why = [w for p in parts for w in p[3]]
            bad = [(int(positions[i]), why[i]) for i in order if why[i]]
            if bad and policy == "error":
                return bad[0]
            good = np.array([i for i in order if not why[i]], dtype=np.int64)
            if h5 is not None and len(good):
                group = h5[split]
                group["features"][progress.rows:progress.rows + len(good)] = np.concatenate([p[0] for p in parts])[good]
                group["labels"][progress.rows:progress.rows + len(good)] = np.concatenate([p[1] for p in parts])[good]
                h5.flush()
            progress.rows += len(good)
            progress.skipped += bad
            progress.done += len(positions)
            if h5 is not None:
                _save_progress(h5[split], progress)
                h5.flush()
            bar.update(task, advance=len(positions),
                       info=f"{len(progress.skipped)} unreadable" if progress.skipped else "")
    return None


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
