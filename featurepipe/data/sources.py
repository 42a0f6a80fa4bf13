"""Every --data source becomes a Catalog: ids, labels, a fixed class list and a way to read each image.

Sources: `demo` (scikit-learn's digits), a MedMNIST-style `.npz`, a CSV manifest
`path,label[,split][,group]`, a folder with train/[val/]test subfolders of class folders, or a folder of class folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featurepipe.data.images import IMAGE_EXTENSIONS, decode, is_gray, open_image, read_file
from featurepipe.errors import FeaturepipeError
from featurepipe.progress import gib, log

SPLITS = ("train", "val", "test")
PATH_ALIASES = ("filename", "file", "image", "image_path", "filepath")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}


class ArrayStore:
    """Images already in memory as one (N, H, W[, C]) uint8 array."""

    in_memory = True

    def __init__(self, images: np.ndarray, name: str) -> None:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise FeaturepipeError(f"{name}: images must be (N, H, W) or (N, H, W, C) arrays, got {images.shape}")
        self.images = images if images.dtype == np.uint8 else _to_uint8(images)
        self.name = name

    def read(self, i: int, size: int | None, channels: int) -> np.ndarray:
        arr = self.images[i]
        if (size is None or arr.shape[:2] == (size, size)) and arr.shape[-1] == channels:
            return arr
        mode = "L" if arr.shape[-1] == 1 else "RGBA" if arr.shape[-1] == 4 else "RGB"
        return decode(Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode), size, channels)

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def peek(self, i: int) -> tuple[tuple[int, int], bool]:
        """(width, height) and whether the image is grey, without decoding more than needed."""
        h, w, c = self.images[i].shape
        return (w, h), c == 1

    def facts(self, i: int) -> tuple[tuple[int, int], str, str]:
        """(width, height), mode and a hash of the pixels (see FileStore.facts)."""
        arr = self.images[i]
        h, w, c = arr.shape
        return (w, h), {1: "L", 3: "RGB", 4: "RGBA"}[c], _digest(f"{arr.shape}", arr.tobytes())


class FileStore:
    """Images as files on disk, decoded on demand."""

    in_memory = False

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def read(self, i: int, size: int | None, channels: int) -> np.ndarray:
        return read_file(self.paths[i], size, channels)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def peek(self, i: int) -> tuple[tuple[int, int], bool]:
        with open_image(self.paths[i]) as img:
            return img.size, is_gray(img)

    def facts(self, i: int) -> tuple[tuple[int, int], str, str]:
        """(width, height), PIL mode and a hash of the decoded pixels. Decodes the whole image, so a
        truncated file shows, and converts it as training would, so an unusable mode shows too."""
        with open_image(self.paths[i]) as img:
            size, mode = img.size, img.mode
            img.load()
            digest = _digest(f"{mode} {size}", img.tobytes())
            decode(img, 32, 3)
        return size, mode, digest


def _digest(shape: str, pixels: bytes) -> str:
    return hashlib.blake2b(shape.encode() + pixels, digest_size=16).hexdigest()


@dataclass
class Catalog:
    """All images of a source. `given_split` holds the split each image came with, if any; `groups` the
    patient or study each image belongs to, if the source says."""

    source: str
    kind: str
    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    store: ArrayStore | FileStore
    given_split: list[str] | None = None
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def scan(source: str, allow_outside: bool = False) -> Catalog:
    """Read a source's index (not its pixels). A CSV's rows, and a folder's files, must resolve (links
    followed) to files inside the CSV's folder or the data folder unless `allow_outside` (--allow-outside)."""
    if source == "demo":
        return _demo()
    path = Path(source).expanduser()
    if not path.exists():
        raise FeaturepipeError(f"--data {source}: no such file or folder; give an image folder, a CSV, an .npz or 'demo'")
    if path.is_file() and path.suffix.lower() == ".npz":
        return _npz(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv(path, allow_outside)
    if path.is_dir():
        return _folder(path, allow_outside)
    raise FeaturepipeError(f"--data {source}: unknown data source; give an image folder, a .csv manifest, an .npz or 'demo'")


def _demo() -> Catalog:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return Catalog(
        source="demo",
        kind="demo",
        ids=[f"digits/{i:04d}" for i in range(len(images))],
        labels=digits.target.astype(np.int64),
        class_names=[str(c) for c in digits.target_names],
        store=ArrayStore(images, "sklearn digits"),
    )


def _npz(path: Path) -> Catalog:
    check_npz(path)
    try:
        data = np.load(path, allow_pickle=False)
        present = [s for s in SPLITS if f"{s}_images" in data and f"{s}_labels" in data]
        arrays = {k: np.asarray(data[k]) for s in present for k in (f"{s}_images", f"{s}_labels")}
        given_names = np.asarray(data["class_names"]) if "class_names" in data else None
    except (OSError, ValueError, EOFError) as e:  # object arrays: ValueError (pickles are never loaded)
        raise FeaturepipeError(f"{path}: cannot read .npz ({e}); store plain numeric arrays") from None
    if not present:
        raise FeaturepipeError(f"{path}: no 'train_images'/'train_labels' keys; expected a MedMNIST-style .npz")
    images, labels, ids, split = [], [], [], []
    for s in present:
        x, y = arrays[f"{s}_images"], _npz_labels(path, s, arrays[f"{s}_labels"])
        if x.dtype.kind not in "uifb":
            raise FeaturepipeError(f"{path}: {s}_images holds {x.dtype} values; images must be numbers")
        if len(x) != len(y):
            raise FeaturepipeError(f"{path}: {s}_images has {len(x)} rows but {s}_labels has {len(y)}")
        if images and x.shape[1:] != images[0].shape[1:]:
            raise FeaturepipeError(f"{path}: {s}_images are {x.shape[1:]} but {present[0]}_images "
                                   f"{images[0].shape[1:]}; every split needs the same image shape")
        images.append(x)
        labels.append(y)
        ids += [f"{s}/{i:06d}" for i in range(len(x))]
        split += [s] * len(x)
    y = np.concatenate(labels)
    names = [str(c) for c in range(int(y.max()) + 1)]
    if given_names is not None:
        names = [str(c) for c in given_names.reshape(-1)]
        if len(names) <= int(y.max()) or len(set(names)) < len(names):
            raise FeaturepipeError(f"{path}: class_names has {len(names)} entries ({len(set(names))} distinct) "
                                   f"but the labels go up to {int(y.max())}; give one distinct name per label")
    return Catalog(str(path), "npz", ids, y, names, ArrayStore(np.concatenate(images), path.name), split)


_NPZ_KEYS = frozenset({*(f"{s}_{k}" for s in SPLITS for k in ("images", "labels")), "class_names"})


def check_npz(path: Path) -> None:
    """Refuse an .npz from its members' .npy headers, before any data is read: np.load allocates and
    inflates whatever shape a header declares, and a 1.6 MB file of compressed zeros can declare
    (100000, 128, 128). What featurepipe reads must fit twice in the memory free now (the splits are
    joined into one array), and each member must hold the bytes its header declares."""
    if not zipfile.is_zipfile(path):
        raise FeaturepipeError(f"{path}: not an .npz (zip) file; give a MedMNIST-style .npz written by numpy.savez")
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename.removesuffix(".npy")
                if name not in _NPZ_KEYS:
                    continue  # never read
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"{name} is an .npy of format {version[0]}.{version[1]}")
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                    header = f.tell()
                if dtype.hasobject:
                    raise FeaturepipeError(f"{path}: {name} is an object array, which only a pickle can hold and "
                                           "featurepipe never loads; store plain numeric arrays")
                nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if header + nbytes > info.file_size:
                    raise FeaturepipeError(f"{path}: {name} declares {shape} {dtype} ({gib(nbytes)}) but holds "
                                           f"{info.file_size:,} bytes; the file is damaged or forged")
                total += nbytes
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FeaturepipeError(f"{path}: cannot read .npz ({e}); store plain numeric arrays with numpy.savez") from None
    free = available_memory()
    if 2 * total > free:
        raise FeaturepipeError(f"{path}: its arrays hold {gib(total)} once decompressed, more than half the memory "
                               f"free now ({gib(free)}); use an image folder or a CSV manifest for data this large")


def available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable), else the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 1 << 62  # unknown: the headers' own checks still hold


def _npz_labels(path: Path, split: str, y: np.ndarray) -> np.ndarray:
    """Integer class indices 0..K-1, one per image; anything else is refused, not truncated."""
    if y.ndim == 2 and y.shape[1] != 1:
        raise FeaturepipeError(f"{path}: {split}_labels has shape {y.shape}; give one label per image")
    y = y.reshape(-1)
    if y.dtype.kind not in "uifb":
        raise FeaturepipeError(f"{path}: {split}_labels holds {y.dtype} values; labels must be class "
                               "indices 0..K-1 (put the names in a class_names array)")
    if len(y) and (not np.all(np.isfinite(y)) or np.any(y != np.round(y)) or y.min() < 0):
        bad = y[~np.isfinite(y) | (y != np.round(y)) | (y < 0)][0]
        raise FeaturepipeError(f"{path}: {split}_labels holds {bad}; labels must be whole numbers 0..K-1")
    return y.astype(np.int64)


def _csv(path: Path, allow_outside: bool = False) -> Catalog:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FeaturepipeError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
                               "save the manifest as UTF-8") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        for alias in PATH_ALIASES:  # e.g. Kvasir-Capsule's filename,label
            if alias in cols and "path" not in cols:
                cols["path"] = cols[alias]
        missing = [c for c in ("path", "label") if c not in cols]
        if missing:
            raise FeaturepipeError(
                f"{path}: missing column(s) {', '.join(missing)}; a manifest needs path,label[,split][,group]"
            )
        try:
            rows = list(reader)
        except csv.Error as e:  # a field over csv.field_size_limit (131 072 characters): no path is that long
            raise FeaturepipeError(f"{path}:{reader.line_num + 1}: {e}; is this a manifest of path,label rows?") from None
    if not rows:
        raise FeaturepipeError(f"{path}: the manifest has no rows")
    paths, labels, split, groups = [], [], [], []
    folder = os.path.normpath(os.path.abspath(path.parent))
    inside = Inside(folder)
    where: dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        p, label = (row[cols["path"]] or "").strip(), (row[cols["label"]] or "").strip()
        if not p or not label:
            raise FeaturepipeError(f"{path}:{n}: empty path or label")
        if "\0" in p:
            raise FeaturepipeError(f"{path}:{n}: the path holds a NUL byte, which no file name can; fix the row")
        full = os.path.normpath(os.path.join(folder, p))
        if not allow_outside and not inside(full):
            raise FeaturepipeError(f"{path}:{n}: '{p}' lies outside the manifest's folder {path.parent}"
                                   f"{inside.via(full)}; move the images below it, or pass --allow-outside if you "
                                   "trust this manifest")
        # One row per file, however it is spelled or reached: a link to a listed file is that file again.
        real = os.path.realpath(full)
        if real in where:
            raise FeaturepipeError(f"{path}:{n}: '{p}' is listed more than once (as row {where[real]}, spelled "
                                   "otherwise or reached through a link); each image needs one row")
        where[real] = n
        paths.append(p)
        labels.append(label)
        if "group" in cols:
            # An image without a group is a group of its own.
            groups.append((row[cols["group"]] or "").strip() or f"{n}:{p}")
        if "split" in cols:
            s = _SPLIT_ALIASES.get((row[cols["split"]] or "").strip().lower())
            if s is None:
                raise FeaturepipeError(f"{path}:{n}: split {row[cols['split']]!r} is not train, val or test")
            split.append(s)
    names = sorted(set(labels))
    index = {c: i for i, c in enumerate(names)}
    return Catalog(
        source=str(path),
        kind="csv",
        ids=paths,
        labels=np.array([index[c] for c in labels], dtype=np.int64),
        class_names=names,
        store=FileStore([path.parent / p for p in paths]),
        given_split=split or None,
        groups=groups or None,
    )


class Inside:
    """Whether a path lies inside `folder` once every link is followed: a link inside the folder
    (img/esc -> /elsewhere) would otherwise carry a path that looks inside to a file that is not."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.path.realpath(folder)

    def __call__(self, path: str | os.PathLike) -> bool:
        return os.path.commonpath([self.folder, os.path.realpath(path)]) == self.folder

    def via(self, path: str | os.PathLike) -> str:
        """' (it leads to REAL through a link)' where links took the path elsewhere, for the message."""
        real = os.path.realpath(path)
        return f" (it leads to {real} through a link)" if real != os.path.normpath(os.path.abspath(path)) else ""


def _ignored(name: str) -> bool:
    # Hidden files (.DS_Store, macOS's ._ twins), unzip leftovers and NAS thumbnail folders are not data.
    return name.startswith(".") or name in ("__MACOSX", "@eaDir")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not _ignored(p.name))


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(_ignored(part) for part in p.relative_to(folder).parts)
    )


def _hidden_classes(folder: Path, used: dict[str, Path]) -> None:
    """Warn of hidden folders beside the class folders that hold images nothing else uses: a class named
    '...' or '.b' would otherwise vanish without a word (one holding the targets of class links does not)."""
    for d in sorted(d for d in folder.iterdir() if d.name.startswith(".") and d.is_dir()):
        left = [p for p in _images_under(d) if os.path.realpath(p) not in used]
        if left:
            log(f"warning: {d}: this hidden folder holds {len(left)} image(s) that are left out; a folder whose "
                "name starts with '.' is never a class, so rename it if it is one")


def _folder(root: Path, allow_outside: bool = False) -> Catalog:
    dirs = {_SPLIT_ALIASES.get(d.name.lower()): d for d in _subdirs(root)}
    dirs.pop(None, None)
    if "train" in dirs and "test" in dirs:
        layout = {s: dirs[s] for s in SPLITS if s in dirs}
    elif dirs:
        raise FeaturepipeError(
            f"{root}: has {', '.join(d.name for d in dirs.values())}/ but not both train/ and test/; "
            "use train/[val/]test/ folders of class folders, or class folders only"
        )
    else:
        layout = {None: root}
    per_split: dict[str | None, dict[str, list[Path]]] = {}
    for s, folder in layout.items():
        classes = {d.name: _images_under(d) for d in _subdirs(folder)}
        if not classes:
            raise FeaturepipeError(f"{folder}: no class folders found; put each class's images in its own folder")
        per_split[s] = classes
    names = sorted({c for classes in per_split.values() for c in classes})
    index = {c: i for i, c in enumerate(names)}
    paths, labels, split = [], [], []
    for s, classes in per_split.items():
        for c, files in classes.items():
            paths += files
            labels += [index[c]] * len(files)
            split += [s] * len(files)
    if not allow_outside:
        inside = Inside(root)
        for p in paths:
            if not inside(p):
                raise FeaturepipeError(f"{root}: '{p.relative_to(root).as_posix()}' lies outside the data folder"
                                       f"{inside.via(p)}; copy the images in, or pass --allow-outside if you trust "
                                       "this folder's links")
    # One image per file, however links lead to it: a class folder linked to the data folder (or to another
    # class) would make a class of other classes' images, an image linked to another a copy in two splits.
    seen: dict[str, Path] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise FeaturepipeError(f"{root}: '{p.relative_to(root).as_posix()}' is "
                                   f"'{seen[real].relative_to(root).as_posix()}' again, reached through a link; "
                                   "each image must be in the data once, so remove the link")
        seen[real] = p
    for folder in layout.values():
        _hidden_classes(folder, seen)
    counts = np.bincount(labels, minlength=len(names)) if labels else np.zeros(len(names), int)
    for c, n in zip(names, counts):
        if n == 0:
            raise FeaturepipeError(f"{root}: class folder '{c}' has no images; add images or remove the folder")
    return Catalog(
        source=str(root),
        kind="folders" if None in layout else "split-folders",
        ids=[p.relative_to(root).as_posix() for p in paths],
        labels=np.array(labels, dtype=np.int64),
        class_names=names,
        store=FileStore(paths),
        given_split=None if None in layout else split,
    )


def _to_uint8(images: np.ndarray) -> np.ndarray:
    images = images.astype(np.float32)
    finite = np.isfinite(images)
    lo, hi = (float(images[finite].min()), float(images[finite].max())) if finite.any() else (0.0, 0.0)
    # NaN and infinite pixels become the darkest value, as in float image files (images.to_channels):
    # one of them must not turn every image of every split to zero.
    images = np.where(finite, images, lo)
    return np.round((images - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)


def name_classes(catalog: Catalog, names: str | None, option: str = "--class-names") -> Catalog:
    """Names for the classes of an .npz, whose labels are only numbers (comma-separated, for 0, 1, ...)."""
    if not names:
        return catalog
    given = [n.strip() for n in names.split(",")]
    if catalog.kind != "npz":
        raise FeaturepipeError(f"{option} {names}: only for an .npz; {catalog.source} names its classes itself")
    if not numbered(catalog.class_names) and given != catalog.class_names:
        raise FeaturepipeError(f"{option} {names}: {catalog.source} names its classes itself in its class_names array "
                               f"({', '.join(catalog.class_names)}); drop {option}, or change the array")
    if len(given) != len(catalog.class_names) or len(set(given)) < len(given) or not all(given):
        raise FeaturepipeError(f"{option} {names}: {catalog.source} has {len(catalog.class_names)} classes "
                               f"(labels 0..{len(catalog.class_names) - 1}); give one distinct name for each, in order")
    catalog.class_names = given
    return catalog


def numbered(class_names: list[str]) -> bool:
    """Are these only an .npz's label numbers 0, 1, ..., K-1 (no class_names array, nor --class-names)?"""
    return class_names == [str(k) for k in range(len(class_names))]
