"""A run is a directory; this module knows its layout, its config and how to write into it safely."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from featurepipe.errors import FeaturepipeError


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def skipped(self) -> Path:
        """Images left out because they could not be read (id, split, label, reason)."""
        return self.root / "skipped.csv"

    @property
    def cnn(self) -> Path:
        return self.root / "cnn"

    @property
    def checkpoint(self) -> Path:
        return self.cnn / "model.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.cnn / "last.pt"

    @property
    def history(self) -> Path:
        return self.cnn / "history.csv"

    @property
    def cnn_metrics(self) -> Path:
        return self.cnn / "metrics.json"

    @property
    def features(self) -> Path:
        return self.root / "features.h5"

    @property
    def heads(self) -> Path:
        return self.root / "heads"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    def fold(self, k: int) -> "RunPaths":
        """Fold k of a k-fold run: a run of its own, inside this one."""
        return RunPaths(self.root / "folds" / f"fold{k}")

    def predictions(self, model: str, split: str = "test") -> Path:
        """Predictions of `model` ("cnn" or a head name) on one split."""
        return self._model_dir(model) / f"{_prefix(model)}{split}_predictions.csv"

    def report(self, model: str) -> Path:
        return self._model_dir(model) / f"{_prefix(model)}classification_report.txt"

    def head_model(self, name: str) -> Path:
        """The joblib export of a head, for users; featurepipe itself never loads it (see head_safe)."""
        return self.heads / f"{name}.joblib"

    def head_safe(self, name: str) -> Path:
        """The same head in skops format: what predict loads, with an explicit list of trusted types."""
        return self.heads / f"{name}.skops"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def head_info(self, name: str) -> Path:
        return self.heads / f"{name}.json"

    def _model_dir(self, model: str) -> Path:
        return self.cnn if model == "cnn" else self.heads


def _prefix(model: str) -> str:
    return "" if model == "cnn" else f"{model}."


def run_paths(root: str | os.PathLike) -> RunPaths:
    return RunPaths(Path(root))


def require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise FeaturepipeError(f"{path}: no {what} found; {fix}")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A killed process therefore never leaves a half-written file under the real name. Under torchrun
    only rank 0 publishes: the other ranks compute the same results and their copies are dropped.
    """
    from featurepipe.distributed import is_main

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
    try:
        yield tmp
        if is_main():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_path(path: Path) -> Path:
    """Where a long write of `path` keeps its progress until complete; no command reads it as `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.partial")


def skipped_beside(path: Path) -> Path:
    """The skipped-images list of a file written outside a run (extract --data ... --out FILE)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.skipped.csv")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FeaturepipeError(f"{path}: not valid JSON ({e}); delete it and re-run the command that writes it")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def environment() -> dict[str, Any]:
    """Library versions and machine facts, saved beside every result for reproducibility."""
    import h5py
    import numpy
    import PIL
    import sklearn
    import torch
    import torchvision

    import featurepipe

    return {
        "featurepipe": featurepipe.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "pillow": PIL.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_config(run: RunPaths) -> dict[str, Any]:
    require(run.config, "run config", f"train a CNN first: featurepipe train-cnn --data SRC --out {run.root}")
    return read_json(run.config)
