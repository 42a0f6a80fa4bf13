"""extract: the trained CNN as a batched feature extractor, writing features.h5 (its schema, writer and
readers are features.py's). Images stream from their files straight into the model, each decoded
once and none kept; a killed extract re-run with the same checkpoint and images resumes after the
last complete batch (features.open_partial) and yields the same features.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe import distributed, features
from featurepipe.data.fingerprint import check_same_data
from featurepipe.data.sources import numbered as numbered_classes
from featurepipe.device import autocast, choose_precision, images_per_pass, in_passes, resolve_device, to_device
from featurepipe.errors import FeaturepipeError
from featurepipe.files import cannot_write, partial_path, read_json, require
from featurepipe.models import LAYERS, TTA, create_model, fingerprint, load_checkpoint
from featurepipe.models.embedding import check_choice
from featurepipe.progress import log, progress_bar
from featurepipe.run_config import RunConfig
from featurepipe.runs import check_output, run_paths, skipped_beside, train_advice

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
    require(paths.checkpoint, "trained CNN", train_advice(paths.root, cfg.data.source))
    if (data is None) != (out is None):
        raise FeaturepipeError("--data and --out go together: embed another source into the file --out names")
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size {batch_size}: must be at least 1")
    check_choice("--layer", layer, LAYERS)
    check_choice("--tta", tta, TTA)
    check_choice("--compression", compression, features.COMPRESSION)
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
        catalog = _relabel(fdata.scan(data, allow_outside), class_names, cfg.data.kind == "npz")
        splits = fdata.assign_splits(catalog, cfg.seed)
        target, policy = Path(out), on_bad_image

    attrs = {
        "class_names": json.dumps(class_names), "arch": meta["arch"], "layer": layer, "tta": tta,
        "checkpoint": fingerprint(paths.checkpoint), "img_size": meta["img_size"], "source": catalog.source,
        "schema_version": features.SCHEMA_VERSION, "precision": precision.record(dev)["forward"],
        **({"frozen": cfg.weights} if frozen else {}),
    }
    pin = dev.type == "cuda"
    ids = {split: [catalog.ids[i] for i in splits[split]] for split in fdata.SPLITS}
    partial = partial_path(target)
    # Under torchrun every rank embeds an interleaved shard of each split and rank 0 alone writes the
    # one file, in the same row order as a single process would.
    rank, world = distributed.rank(), distributed.world_size()
    if rank == 0:
        features.reserve_space(partial, sum(len(v) for v in ids.values()) * (4 * dim + 8 + 64) + (1 << 20))
    with cannot_write(partial):
        h5 = features.open_partial(partial, attrs, ids, dim, compression) if rank == 0 else None
    progress = distributed.broadcast_object({s: features.read_progress(h5[s]) for s in fdata.SPLITS}
                                            if h5 is not None else None)
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
        with features.damaged_if_failed(partial, lambda: h5):
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
                        features.finish_split(h5[split])
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
    if data is not None and skipped:
        fdata.save_skipped(skipped_beside(target), skipped)
    elif data is not None and rank == 0:
        # Written only where an image was skipped, as predict does: a header alone beside every file made
        # the same command, run again after deleting it, refuse over a list featurepipe wrote itself. An
        # older list there is gone with it (--overwrite let it be replaced), so none outlives its file.
        skipped_beside(target).unlink(missing_ok=True)
    distributed.barrier()
    n = sum(len(v) for v in splits.values()) - len(skipped)
    log(f"{'frozen pretrained ' if frozen else ''}features of {n} images ({dim}-d, {layer}, tta {tta}) → {target}; "
        f"{precision.describe(dev, training=False)}")
    return target


def _relabel(catalog: fdata.Catalog, class_names: list[str], run_on_npz: bool) -> fdata.Catalog:
    """The source's labels as indices into the run's classes, matched by name. An .npz that does not name its
    classes holds the class indices themselves, which for a run trained on an .npz are the run's: their names
    (a class_names array or --class-names) carry over."""
    numbered = catalog.kind == "npz" and numbered_classes(catalog.class_names)
    if numbered and run_on_npz:
        if len(catalog.class_names) > len(class_names):
            raise FeaturepipeError(f"{catalog.source}: its labels go up to {len(catalog.class_names) - 1}, but the "
                                   f"run has {len(class_names)} classes ({', '.join(class_names)}); give an .npz of "
                                   "the run's classes")
        catalog.class_names = list(class_names)
        return catalog
    unknown = sorted(set(catalog.class_names) - set(class_names))
    if unknown:
        raise FeaturepipeError(
            f"{catalog.source}: class(es) {', '.join(unknown)} are not among the run's classes ({', '.join(class_names)})"
            + ("; name them in a class_names array in the .npz" if numbered else "")
        )
    index = np.array([class_names.index(c) for c in catalog.class_names])
    catalog.labels, catalog.class_names = index[catalog.labels], list(class_names)
    return catalog


@torch.inference_mode()
def _write_split(h5: h5py.File | None, split: str, embed, batches, n_batches: int, position: np.ndarray, total: int,
                 batch_size: int, progress: features.Progress, policy: str) -> tuple[int, str] | None:
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
                features.write_rows(h5[split], progress.rows, np.concatenate([p[0] for p in parts])[good],
                                    np.concatenate([p[1] for p in parts])[good])
                h5.flush()
            progress.rows += len(good)
            progress.skipped += bad
            progress.done += len(positions)
            if h5 is not None:
                features.save_progress(h5[split], progress)
                h5.flush()
            bar.update(task, advance=len(positions),
                       info=f"{len(progress.skipped)} unreadable" if progress.skipped else "")
    return None


