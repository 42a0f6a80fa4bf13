"""Writing and reading files, whatever they hold: atomically (a temporary name, renamed on success), a
full disk or a missing permission as one line, JSON, sha256, spreadsheet-safe CSV cells. Every layer
writes through here; runs.py knows what the files of a run are called.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from featurepipe.errors import FeaturepipeError


def require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise FeaturepipeError(f"{path}: no {what} found; {fix}")
    if not path.is_file():  # every path required is a file featurepipe wrote; opening a folder is a traceback
        raise FeaturepipeError(f"{path}: {'a folder' if path.is_dir() else 'not a regular file'}, not the {what} "
                               f"featurepipe wrote; move it away, then {fix}")
    return path


@contextlib.contextmanager
def atomic_path(path: Path, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A killed process therefore never leaves a half-written file under the real name. Every process
    that calls it writes: under torchrun, commands write from rank 0 alone (train-cnn, extract).
    `exclusive`: `path` is created, never replaced (FileExistsError where it exists): of jobs racing to
    create one file, on a shared filesystem too (a hard link is atomic there as well), exactly one wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with cannot_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
    try:
        with cannot_write(path):
            yield tmp
            if exclusive:
                os.link(tmp, path)
            else:
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# A full disk, a quota, a file-size limit, a read-only or foreign folder: the user's to fix, in one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def cannot_write(path: Path) -> Iterator[None]:
    """Turn a write that fails for lack of space or permission into one line naming `path`."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise FeaturepipeError(f"{path}: cannot write ({os.strerror(e.errno)}); free space or fix the "
                               "permissions, then re-run the command (finished files are intact)") from None


def partial_path(path: Path) -> Path:
    """Where a long write of `path` keeps its progress until complete; no command reads it as `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.partial")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:  # a folder or an unreadable file where a file is named: callers vet, this is the backstop
        raise FeaturepipeError(f"{path}: cannot read it ({e.strerror or e}); put back the file featurepipe wrote "
                               "there, or re-run the command that writes it") from None
    return h.hexdigest()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, _json_text(obj))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_jsonable) + "\n"


def create_json(path: Path, obj: Any) -> bool:
    """Write `path` whole, unless it exists: False, and the file there is left as it is."""
    try:
        with atomic_path(path, exclusive=True) as tmp:
            tmp.write_text(_json_text(obj), encoding="utf-8")
    except FileExistsError:
        return False
    return True


def read_json(path: Path) -> Any:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FeaturepipeError(f"{path}: not valid JSON ({e}); delete it and re-run the command that writes it") from None
    except (IsADirectoryError, PermissionError) as e:  # missing files are the caller's: its message says what to run
        raise FeaturepipeError(f"{path}: cannot read it ({e.strerror}); put back the file featurepipe wrote there, "
                               "or re-run the command that writes it") from None
    if not isinstance(obj, dict):  # every JSON file featurepipe writes holds one object
        raise FeaturepipeError(f"{path}: not the JSON object featurepipe writes; delete it and re-run the command "
                               "that writes it")
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


# CSV cells a spreadsheet would run as a formula (OWASP "CSV injection"): prefixed with an apostrophe,
# which spreadsheets hide. A cell that starts with an apostrophe gets one more, so read_cell reverses it.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(text: str) -> str:
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def read_cell(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell
