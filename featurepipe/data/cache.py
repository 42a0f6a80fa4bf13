"""Decode once: a file archive's images at the model's input size, kept on disk as one memory-mapped
uint8 array, for archives whose splits do not fit in memory (data/dataset.py's cap).

Without it such a split is decoded again every epoch and once more by `extract`; 2000-px scans take
tens of milliseconds each. With it, train-cnn's check pass (which decodes every image anyway) writes
the pixels once; later epochs, `extract`, compare's gallery and a re-run on the same data at the same
size gather rows from the map as they would from memory (the page cache keeps what fits, the disk
serves the rest).

Where: a user cache folder, not the run. The pixels depend on the data and the size alone, not on the
run, so a second run on the same data (another --arch, --seed, a re-run after deleting the run) finds
them; runs stay small to copy. FEATUREPIPE_CACHE_DIR moves it (`off` streams as before); each cache is
a folder named by its key, deleted by hand (the log says where and how big).

Key: every file's path, size, modification time, change time and inode, the image size and channel
count; change any file and the key changes. The change time is what catches a file rewritten in place
with its size and mtime put back (`cp -p`, `rsync -t`, `tar` restore the mtime; nothing but the kernel
sets the ctime), the inode a file replaced by another. Resumable: rows are written, made durable, then
recorded in state.json (replaced atomically), so an interrupted fill continues where its last record
stopped. Damage to the whole (a short file, a foreign header, a state that does not parse, rows whose
checksum changed in a sample) is detected on opening and the cache rebuilt; each row's checksum is
checked again the first time a process reads it, and a row that fails is decoded from its file
instead (and rewritten by the next fill). Unreadable images are recorded with their reason, so the
bad-image policy and skipped.csv come out as from decoding.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from featurepipe.data import workers
from featurepipe.data.images import UnreadableImage
from featurepipe.data.sources import FileStore
from featurepipe.errors import FeaturepipeError
from featurepipe.files import atomic_path, cannot_write
from featurepipe.progress import gib, log

# In-memory cap (bytes of decoded images per split) above which a split goes to the disk cache.
MEMORY_BYTES = 4 * 1024**3
VERSION = 1
TODO, OK, BAD = 0, 1, 2
# Rows are made durable and recorded at least this often: what an interruption can cost.
RECORD_ROWS, RECORD_SECONDS = 4096, 30.0
CHECKED_ROWS = 64  # rows whose checksum is verified on opening: a cheap sample, not a full read


def memory_bytes() -> int:
    value = os.environ.get("FEATUREPIPE_CACHE_BYTES", "")
    try:
        return int(float(value)) if value else MEMORY_BYTES
    except ValueError:
        raise FeaturepipeError(f"FEATUREPIPE_CACHE_BYTES={value}: give a number of bytes") from None


def fits_in_memory(n: int, size: int, channels: int) -> bool:
    """Whether n decoded images stay in memory; a split that does not goes to the disk cache."""
    return n * size * size * channels <= memory_bytes()


def root() -> Path | None:
    """The folder caches live under; None when FEATUREPIPE_CACHE_DIR is `off`."""
    value = os.environ.get("FEATUREPIPE_CACHE_DIR", "")
    if value.lower() in ("off", "none", "0"):
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featurepipe" / "decoded"


def key(store: FileStore, size: int, channels: int) -> str:
    h = hashlib.blake2b(f"v{VERSION} {size} {channels}\n".encode(), digest_size=12)
    for path in store.paths:
        try:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}\n".encode())
        except OSError:  # gone: recorded as unreadable; its return changes the key
            h.update(f"{os.path.abspath(path)} -\n".encode())
    return h.hexdigest()


class DiskCache:
    """The store of a cached archive: rows already decoded are read from the map, the rest from the
    files (a partial cache still serves what it has). `in_memory` as an ArrayStore: reads are cheap,
    loaders need no worker processes and gather whole batches (ImageDataset.__getitems__)."""

    in_memory = True

    def __init__(self, source: FileStore, folder: Path, size: int, channels: int) -> None:
        self.source, self.folder, self.size, self.channels = source, folder, size, channels
        self.shape = (len(source.paths), size, size, channels)
        self.status = np.zeros(len(source.paths), np.int8)
        self.crc = np.zeros(len(source.paths), np.uint32)
        self.reasons: dict[int, str] = {}
        self.images: np.ndarray | None = None
        # Rows whose checksum this process has checked, and those that failed (kept across a reopen,
        # so the next fill decodes them again).
        self.checked = np.zeros(len(source.paths), bool)
        self.damaged: set[int] = set()

    data = property(lambda self: self.folder / "images.npy")
    state = property(lambda self: self.folder / "state.json")

    # The store's interface (sources.ArrayStore / FileStore).
    def read(self, i: int, size: int | None, channels: int) -> np.ndarray:
        if self.status[i] == BAD:
            raise UnreadableImage(self.source.describe(i), self.reasons[i])
        if (size, channels) == (self.size, self.channels) and self.ready(np.array([i])):
            return self.images[i]
        return self.source.read(i, size, channels)

    def ready(self, indices: np.ndarray) -> bool:
        """Whether every one of these rows can be gathered from the map as it is; every read of the map
        asks first, so rows are checked against their checksum here, once per process."""
        unchecked = indices[(self.status[indices] == OK) & ~self.checked[indices]]
        for i in unchecked.tolist():
            if zlib.crc32(np.ascontiguousarray(self.images[i])) != self.crc[i]:
                if not self.damaged:
                    log(f"warning: decode cache {self.folder}: row {i} ({self.source.describe(i)}) changed since it "
                        "was written; such rows are decoded from their files until a fill rewrites them (or delete the folder)")
                self.status[i] = TODO
                self.damaged.add(i)
        self.checked[unchecked] = True
        return bool((self.status[indices] == OK).all())

    def describe(self, i: int) -> str:
        return self.source.describe(i)

    def peek(self, i: int):
        return self.source.peek(i)

    def facts(self, i: int):
        return self.source.facts(i)

    @property
    def paths(self) -> list[str]:
        return self.source.paths

    @property
    def nbytes(self) -> int:
        return _header_bytes(self.shape) + int(np.prod(self.shape))

    # Opening, filling, recording.
    def open(self) -> str:
        """Load state and map the pixels; returns '' or why the folder's content cannot be used."""
        try:
            state = json.loads(self.state.read_text(encoding="utf-8"))
            if state.get("version") != VERSION or tuple(state["shape"]) != self.shape:
                return "written for another shape or version"
            status = np.frombuffer(zlib.decompress(base64.b64decode(state["status"])), np.int8)
            crc = np.frombuffer(zlib.decompress(base64.b64decode(state["crc"])), np.uint32)
            reasons = {int(k): v for k, v in state["reasons"].items()}
        except (OSError, ValueError, KeyError, TypeError, zlib.error) as e:
            return f"state.json unreadable ({type(e).__name__})"
        if len(status) != len(self.status) or len(crc) != len(self.crc) or \
                set(np.flatnonzero(status == BAD)) != set(reasons):
            return "state.json inconsistent"
        try:
            if self.data.stat().st_size != self.nbytes:
                return f"images.npy is {self.data.stat().st_size} bytes, not {self.nbytes}"
            images = np.load(self.data, mmap_mode="c")  # copy-on-write: writable views for torch, nothing written back
        except (OSError, ValueError) as e:
            return f"images.npy unreadable ({type(e).__name__})"
        if images.shape != self.shape or images.dtype != np.uint8:
            return f"images.npy holds {images.dtype} {images.shape}"
        done = np.flatnonzero(status == OK)
        sample = np.random.default_rng().choice(done, min(len(done), CHECKED_ROWS), replace=False) if len(done) else []
        for i in sample:
            if zlib.crc32(np.ascontiguousarray(images[i])) != crc[i]:
                return f"row {i} changed since it was written"
        self.status, self.crc, self.reasons, self.images = status.copy(), crc.copy(), reasons, images
        self.status[list(self.damaged)] = TODO
        self.checked[:] = False
        return ""

    def create(self) -> None:
        """An empty cache: the pixels' file with its blocks reserved (a full disk now, not half-way
        through the fill), then the state that makes the folder valid."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        header = _header(self.shape)
        with open(self.data, "wb") as f:
            f.write(header)
            try:
                os.posix_fallocate(f.fileno(), 0, self.nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                    raise
                f.truncate(self.nbytes)
        self.status[:], self.checked[:], self.reasons = TODO, False, {}
        self.damaged.clear()
        self._record()
        self.images = np.load(self.data, mmap_mode="c")

    def fill(self, indices: np.ndarray, *, stop_at_first: bool = False, description: str = "decode") -> dict[int, str]:
        """Decode the rows at `indices` the cache lacks; returns {k: reason} for each indices[k] that is
        unreadable (as load.decode_all). With `stop_at_first` the first failure raises UnreadableImage,
        after what was decoded so far is recorded."""
        # Opened again under the lock: another process may have filled rows meanwhile. A full disk or a
        # folder not ours is one line (FEATUREPIPE_CACHE_DIR=off does without); rows recorded so far stay.
        with cannot_write(self.folder), self._locked():
            todo = indices[self.status[indices] == TODO]
            if len(todo):
                self._decode(todo, stop_at_first, description)
            self.images = np.load(self.data, mmap_mode="c")
        failed = {k: self.reasons[int(i)] for k, i in enumerate(indices) if self.status[i] == BAD}
        if failed and stop_at_first:
            k = min(failed)
            raise UnreadableImage(self.source.describe(int(indices[k])), failed[k])
        return failed

    def _decode(self, todo: np.ndarray, stop_at_first: bool, description: str) -> None:
        row, offset = int(np.prod(self.shape[1:])), _header_bytes(self.shape)
        written: list[int] = []
        last = time.monotonic()
        fd = os.open(self.data, os.O_WRONLY)
        try:
            for j, arr, why in workers.each_image(self.source, todo, _Read(self.size, self.channels), description):
                i = int(todo[j])
                if why:
                    self.status[i], self.reasons[i] = BAD, why
                    if stop_at_first:
                        break
                    continue
                pixels = np.ascontiguousarray(arr)
                os.pwrite(fd, pixels, offset + i * row)
                self.crc[i] = zlib.crc32(pixels)
                self.damaged.discard(i)
                written.append(i)
                if len(written) >= RECORD_ROWS or time.monotonic() - last > RECORD_SECONDS:
                    self._commit(fd, written)
                    written, last = [], time.monotonic()
        finally:
            self._commit(fd, written)
            os.close(fd)

    def _commit(self, fd: int, written: list[int]) -> None:
        # Pixels durable first, then the record that claims them.
        os.fsync(fd)
        self.status[written] = OK
        self._record()

    def _record(self) -> None:
        state = {
            "version": VERSION, "shape": list(self.shape), "source": self.source.describe(0) if self.shape[0] else "",
            "status": base64.b64encode(zlib.compress(self.status.tobytes())).decode(),
            "crc": base64.b64encode(zlib.compress(self.crc.tobytes())).decode(),
            "reasons": {str(i): why for i, why in sorted(self.reasons.items())},
        }
        with atomic_path(self.state) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())  # the record claims durable pixels: it must be durable itself

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One filler at a time (torchrun's processes, two commands on the same data): the others wait,
        then find the rows done."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path(self.folder), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                why = self.open() if self.folder.exists() else "new"
                if why:
                    if why != "new":
                        log(f"warning: decode cache {self.folder} is damaged ({why}); decoding again")
                    self.create()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class _Read:
    """Picklable for loader workers: the decoded pixels of one file at the cache's size."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = size, channels

    def __call__(self, store: FileStore, i: int) -> np.ndarray:
        return store.read(i, self.size, self.channels)


def _header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _header_bytes(shape: tuple[int, ...]) -> int:
    return len(_header(shape))


def lock_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.lock"


def unusable(folder: Path) -> str:
    """Why a cache cannot live at `folder` ('' when it can): its parent cannot be made or written (a file
    named as FEATUREPIPE_CACHE_DIR, a read-only file system or HOME), or the folder or its lock is not
    what featurepipe made there (a file, or a link that could lead anywhere)."""
    base = folder.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {base} ({e.strerror or type(e).__name__})"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable"
    for path, kind in ((folder, "folder"), (lock_path(folder), "file")):
        if path.is_symlink() or (path.exists() and not (path.is_dir() if kind == "folder" else path.is_file())):
            return f"{path} is not the {kind} featurepipe made there"
    return ""


def for_archive(store, counts: list[int], size: int, channels: int) -> DiskCache | None:
    """The disk cache train-cnn fills, where a split of this file archive is too big for memory and a
    usable cache folder is configured with room for it; else None (the split streams, as before)."""
    base = root()
    if store.in_memory or base is None or all(fits_in_memory(n, size, channels) for n in counts):
        return None
    cache = DiskCache(store, base / key(store, size, channels), size, channels)
    why = unusable(cache.folder)
    if why:
        log(f"warning: no decode cache ({why}): images above the memory cap are decoded every epoch; "
            "FEATUREPIPE_CACHE_DIR moves the cache")
        return None
    if not cache.folder.exists() or cache.open():
        free = shutil.disk_usage(base).free
        if free < 1.1 * cache.nbytes:
            log(f"warning: no room for a decode cache in {base} ({gib(cache.nbytes)} needed, {gib(free)} free): "
                "images above the memory cap are decoded every epoch; FEATUREPIPE_CACHE_DIR moves the cache")
            return None
    log(f"decode cache: {cache.shape[0]} images at {size}x{size}x{channels} in {cache.folder} "
        f"({gib(cache.nbytes)} on disk, {gib(shutil.disk_usage(base).free)} free); "
        "FEATUREPIPE_CACHE_DIR moves it (off: decode every epoch)")
    return cache


def reuse(store, size: int, channels: int):
    """The disk cache of this file archive at this size where one exists (extract, the gallery, a
    re-run), else the store itself; creates nothing."""
    base = root()
    if store.in_memory or base is None or not base.is_dir():  # no cache at all: spare stat-ing every file
        return store
    cache = DiskCache(store, base / key(store, size, channels), size, channels)
    if cache.folder.is_symlink() or not cache.folder.is_dir() or cache.open():
        return store
    log(f"reading decoded images from {cache.folder} ({int((cache.status == OK).sum())} of {cache.shape[0]} cached)")
    return cache
