"""The trained CNN as a batched feature extractor, and the HDF5 schema of `features.h5`.

Schema (the one place it is defined):
  /<split>/features  float32 (N, D)   the embedding (`layer` attribute says which)
  /<split>/labels    int64   (N,)     index into class_names
  /<split>/ids       str     (N,)     image ids as in the run's splits.json
  attrs: class_names, arch, layer, tta, checkpoint (fingerprint), img_size, source, schema_version
  (`layer` and `tta` as in models.embedding; files without `tta` were written without TTA)
Rows are written batch by batch into chunked datasets, so memory does not grow with the data set,
and the file only appears under its real name once complete.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe.device import autocast, resolve_device, to_device
from featurepipe.errors import FeaturepipeError
from featurepipe.models import LAYERS, TTA, fingerprint, load_checkpoint
from featurepipe.models.embedding import check_choice
from featurepipe.progress import log, progress_bar
from featurepipe.runs import atomic_path, load_config, read_json, require, run_paths

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20


@dataclass
class FeatureSplit:
    features: np.ndarray | h5py.Dataset  # a Dataset (from open_split) reads only the rows sliced from it
    labels: np.ndarray
    ids: list[str]


def extract(run: str | Path, batch_size: int = 256, data: str | None = None, out: str | Path | None = None,
            device: str = "auto", amp: bool = True, layer: str = "penultimate", tta: str = "none") -> Path:
    """Embed every split of the run's data (or of another source, with `data` and `out`) into HDF5."""
    paths = run_paths(run)
    cfg = load_config(paths)
    require(paths.checkpoint, "trained CNN", f"run featurepipe train-cnn --out {paths.root} first")
    if (data is None) != (out is None):
        raise FeaturepipeError("--data and --out go together: embed another source into the file --out names")
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size {batch_size}: must be at least 1")
    check_choice("--layer", layer, LAYERS)
    check_choice("--tta", tta, TTA)
    dev = resolve_device(device)
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
    else:
        catalog = _relabel(fdata.scan(data), class_names)
        splits = fdata.assign_splits(catalog, cfg["train"]["seed"])
        target = Path(out)

    attrs = {
        "class_names": json.dumps(class_names), "arch": meta["arch"], "layer": layer, "tta": tta,
        "checkpoint": fingerprint(paths.checkpoint), "img_size": meta["img_size"], "source": catalog.source,
        "schema_version": SCHEMA_VERSION,
    }
    pin = dev.type == "cuda"
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(attrs)
        for split in fdata.SPLITS:
            idx = splits[split]
            ds = fdata.ImageDataset(catalog.store, idx, catalog.labels[idx], meta["img_size"], meta["in_channels"])
            loader = fdata.make_loader(ds, batch_size, pin_memory=pin)
            _write_split(h5, split, net, loader, [catalog.ids[i] for i in idx], dim, dev, amp, layer, tta)
    log(f"features of {sum(len(v) for v in splits.values())} images ({dim}-d, {layer}, tta {tta}) → {target}")
    return target


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
def _write_split(h5: h5py.File, split: str, net, loader, ids: list[str], dim: int, device, amp: bool,
                 layer: str = "penultimate", tta: str = "none") -> None:
    n = len(ids)
    group = h5.create_group(split)
    rows = max(1, min(n, CHUNK_BYTES // (4 * dim)))
    feats = group.create_dataset("features", shape=(n, dim), dtype="float32", chunks=(rows, dim) if n else None)
    labels = group.create_dataset("labels", shape=(n,), dtype="int64")
    group.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
    net.eval()
    start = 0
    with progress_bar() as bar:
        task = bar.add_task(f"extract {split}", total=n, info="")
        for x, y, _ in loader:
            with autocast(device, amp):
                f = net.embed(to_device(x, device), layer, tta)
            stop = start + len(y)
            feats[start:stop] = f.float().cpu().numpy()
            labels[start:stop] = y.numpy()
            start = stop
            bar.advance(task, len(y))


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
