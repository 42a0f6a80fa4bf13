"""`features.h5`: its HDF5 schema, the writer extract drives and the readers heads, crossval and the scripts use.

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
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.files import WRITE_ERRNOS, cannot_write, require
from featurepipe.progress import log

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


def reserve_space(partial: Path, nbytes: int) -> None:
    """Claim the space the features need (uncompressed) once, and give it back, before HDF5 writes any.

    A full disk in the middle of the HDF5 library's writes surfaces as errors it cannot report (then a
    crash, and a damaged file); here it is one line before any work. Another program can still fill
    the disk later: then `damaged_if_failed` and the checks on resuming (`_continues`) take over."""
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
def damaged_if_failed(partial: Path, h5) -> Iterator[None]:
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
class Progress:
    """How far a split of the partial file is: `done` images consumed, `rows` written (the readable
    ones among them, in order), and (position, reason) of each one skipped."""

    done: int = 0
    rows: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


_PROGRESS_ATTRS = tuple(f.name for f in fields(Progress))


def read_progress(group: h5py.Group) -> Progress:
    return Progress(int(group.attrs["done"]), int(group.attrs["rows"]),
                     [(int(p), str(w)) for p, w in json.loads(group.attrs["skipped"])])


def save_progress(group: h5py.Group, progress: Progress) -> None:
    group.attrs["rows"] = progress.rows
    group.attrs["skipped"] = json.dumps(progress.skipped)
    group.attrs["done"] = progress.done


def finish_split(group: h5py.Group) -> None:
    """Drop the skipped images' rows from the split (its ids were written up front) and its index."""
    progress = read_progress(group)
    if progress.skipped:
        gone = {p for p, _ in progress.skipped}
        kept = [i for p, i in enumerate(group["ids"].asstr()[:]) if p not in gone]
        group["features"].resize(progress.rows, axis=0)
        group["labels"].resize(progress.rows, axis=0)
        del group["ids"]
        group.create_dataset("ids", data=np.array(kept, dtype=object), dtype=h5py.string_dtype())
    for key in _PROGRESS_ATTRS:
        del group.attrs[key]


def open_partial(path: Path, attrs: dict[str, Any], ids: dict[str, list[str]], dim: int,
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
        save_progress(group, Progress())
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


def write_rows(group: h5py.Group, start: int, features: np.ndarray, labels: np.ndarray) -> None:
    """Rows start, start + 1, ... of a split; the caller flushes, then moves the split's progress."""
    group["features"][start:start + len(features)] = features
    group["labels"][start:start + len(labels)] = labels


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
