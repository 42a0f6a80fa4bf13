"""A run is a directory; this module knows its layout, which folders are runs, and who may write into one
(run_lock, check_output). How any file is written (atomically, as JSON) is files.py's."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from featurepipe.errors import FeaturepipeError
from featurepipe.files import cannot_write, read_json


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
    def curves(self) -> Path:
        """Training and validation loss and accuracy per epoch."""
        return self.cnn / "curves.png"

    @property
    def features(self) -> Path:
        return self.root / "features.h5"

    @property
    def frozen_features(self) -> Path:
        """Embeddings of the pretrained backbone before fine-tuning (runs that start from --weights)."""
        return self.root / "features.frozen.h5"

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
        return self.heads / f"{head_stem(name)}.joblib"

    def head_safe(self, name: str) -> Path:
        """The same head in skops format: what predict loads, with an explicit list of trusted types."""
        return self.heads / f"{head_stem(name)}.skops"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def head_info(self, name: str) -> Path:
        return self.heads / f"{head_stem(name)}.json"

    def _model_dir(self, model: str) -> Path:
        return self.cnn if model == "cnn" else self.heads


def _prefix(model: str) -> str:
    return "" if model == "cnn" else f"{head_stem(model)}."


# The frozen-features arm: a head fitted on the pretrained backbone's features (features.frozen.h5)
# is stored as heads/<name>.frozen.* and shown as "<name> (ImageNet, frozen)" (or "pretrained" for
# local --weights). Reports, predictions and stack all key models by that label; only file names use
# the stem.
FROZEN_STEM = ".frozen"
_FROZEN_LABEL = re.compile(r"(?P<head>[\w-]+) \((ImageNet|pretrained), frozen\)")


def frozen_label(head: str, weights: str | None) -> str:
    return f"{head} ({'ImageNet' if weights == 'imagenet' else 'pretrained'}, frozen)"


def head_stem(name: str) -> str:
    """The file stem of a head: its name, or <name>.frozen for a frozen-features label."""
    m = _FROZEN_LABEL.fullmatch(name)
    return f"{m['head']}{FROZEN_STEM}" if m else name


def is_frozen(name: str) -> bool:
    return head_stem(name).endswith(FROZEN_STEM)


def run_paths(root: str | os.PathLike) -> RunPaths:
    return RunPaths(Path(root))


@dataclass(frozen=True)
class CrossvalPaths:
    """A cross-validation (`featurepipe crossval`): its plan and one ordinary run per fold."""

    root: Path

    @property
    def plan(self) -> Path:
        """Options, data, folds (the test ids of each), versions: written before the first fold."""
        return self.root / "crossval.json"

    def fold(self, k: int) -> RunPaths:
        return RunPaths(self.root / f"fold{k}")

    @property
    def compare(self) -> Path:
        return self.root / "compare"


def is_crossval(root: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(root) / "crossval.json").read_text(encoding="utf-8")).get("command") == "crossval"
    except (OSError, ValueError, AttributeError):
        return False


# What every reader of crossval.json takes from it; a plan without them is damaged, not a cross-validation's.
PLAN_KEYS = {"data": dict, "crossval": dict, "train": dict, "seed": int, "test_ids": list}


def read_plan(root: Path) -> dict[str, Any]:
    """The plan of the cross-validation in `root`, refused (one line) where it is not the one crossval wrote."""
    path = CrossvalPaths(Path(root)).plan
    plan = read_json(path)
    folds = plan.get("test_ids")
    if (any(not isinstance(plan.get(k), t) for k, t in PLAN_KEYS.items()) or len(folds) < 2
            or not all(isinstance(ids, list) and ids for ids in folds)
            or not all(k in plan["data"] for k in ("source", "index_fingerprint", "class_names"))):
        raise FeaturepipeError(f"{path}: not the plan featurepipe crossval writes (damaged or edited); put back "
                               f"the original, or run the cross-validation again in a new folder")
    return plan


def crossval_holding(path: str | os.PathLike) -> Path | None:
    """The cross-validation `path` is, or lies inside, if any."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return next((p for p in (path, *path.parents) if is_crossval(p)), None)


def crossval_command(root: Path) -> str:
    """The command that continues the cross-validation in `root`, and repairs any of its folds, from its plan:
    its data and every option that is not the default."""
    from featurepipe.options import TrainConfig, declared, flag

    plan = read_plan(root)
    cv = plan["crossval"]
    words = ["featurepipe", "crossval", "--data", plan["data"]["source"], "--out", str(root), "--folds", cv["folds"],
             "--heads", ",".join(cv["heads"]), "--tune", cv["tune"], "--bootstrap", cv["bootstrap"]]
    for f in declared(TrainConfig):
        value = plan["train"].get(f.name, f.default)
        if f.name != "folds" and value != f.default:
            words += ([flag(f.name) if value else "--no-" + f.name.replace("_", "-")] if isinstance(value, bool)
                      else [flag(f.name), value])
    return shlex.join(str(w) for w in words)


def fold_command(root: Path) -> str | None:
    """For a fold of a cross-validation, the crossval command that (re)makes it: train-cnn never writes into one."""
    cv = crossval_holding(root)
    return crossval_command(cv) if cv is not None and cv == Path(os.path.abspath(root)).parent else None


def train_advice(root: Path, source: str = "SRC") -> str:
    """What trains the CNN of the run `root`."""
    command = fold_command(root)
    return f"run {command}" if command else f"train a CNN first: featurepipe train-cnn --data {source} --out {root}"


def check_output(path: Path, option: str, *, folder: bool = False, overwrite: bool = False,
                 beside: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, an output that cannot or must not be written: a folder where a file is
    wanted (or the reverse), a path below a file, a read-only place, or (for files) an existing file
    without --overwrite. A file belonging to a run (inside a folder with config.json) is never replaced
    by another command's --out. `beside`: the other files the command writes (a report folder's
    files, X.skipped.csv beside X), held to the same rule."""
    for other in beside:
        check_output(other, option, overwrite=overwrite)
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise FeaturepipeError(f"{option} {path}: is {'a file' if folder else 'a folder'}; give "
                               f"{'a folder' if folder else 'a file name'}")
    parent = path if folder else path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise FeaturepipeError(f"{option} {path}: {existing} is a file, not a folder; choose another place")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise FeaturepipeError(f"{option} {path}: {path if path.exists() else existing} is not writable; "
                               "choose another place or fix its permissions")
    if not folder and path.exists():
        owner = next((p for p in path.parents if is_run(p)), None)
        if owner is not None:
            raise FeaturepipeError(f"{option} {path}: is a file of the run {owner}; write elsewhere")
        if not overwrite:
            raise FeaturepipeError(f"{option} {path}: already exists; pass --overwrite to replace it")
    return path


def check_outside(path: Path, data: str | os.PathLike, option: str = "--out") -> None:
    """An output inside an image folder would be read back as data (a run folder becomes a class)."""
    source = Path(data).expanduser()
    if not source.is_dir():
        return
    out, source = Path(os.path.abspath(Path(path).expanduser())), Path(os.path.abspath(source))
    if out == source or source in out.parents:
        raise FeaturepipeError(f"{option} {path}: is inside --data {data}, where it would be read as images; "
                               "write it elsewhere")


class Busy(FeaturepipeError):
    """Another command holds the run's lock."""


@contextlib.contextmanager
def run_lock(root: Path, option: str = "--run", create: bool = False, wait: bool = False) -> Iterator[None]:
    """Hold RUN/.lock exclusively while a command writes into the run; a second one is refused at once.

    The lock is the kernel's (flock): it goes with the process, however it ends, so no stale lock is
    ever left. Under torchrun, rank 0 holds it for all ranks. Without `create`, a missing run is left
    for the command to report, and a read-only one (nothing can be written there) is not locked. With
    `wait`, a held lock is waited for (crossval's jobs hold their cross-validation's for moments)."""
    root = Path(root).expanduser()
    from featurepipe.distributed import launch

    if not launch().is_main or (not create and not root.is_dir()):  # rank 0 holds it for all ranks
        yield
        return
    if create:
        check_output(root, option, folder=True)
    lock = RunPaths(root).lock
    made = not root.exists()
    while True:
        try:
            with cannot_write(lock):
                root.mkdir(parents=True, exist_ok=True)
                before = set(os.listdir(root))
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except IsADirectoryError:
            raise FeaturepipeError(f"{lock}: is a folder, not featurepipe's lock file; remove it and re-run") from None
        except FeaturepipeError:
            if create:
                raise
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"{root}: another featurepipe command is writing this run (it holds {lock}); "
                       "wait for it to finish") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed it (below) before we locked it: lock the file there now
    try:
        yield
    finally:
        # Refused before writing anything: leave no trace, neither the folder nor a lock in a user's folder.
        if lock.name not in before and set(os.listdir(root)) == before | {lock.name}:
            lock.unlink(missing_ok=True)
            if made:
                root.rmdir()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def skipped_beside(path: Path) -> Path:
    """The skipped-images list of a file written outside a run (extract --data ... --out FILE)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.skipped.csv")


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


def is_run(root: Path) -> bool:
    """A folder train-cnn made: its config.json is featurepipe's (a user's own config.json is not)."""
    try:
        return json.loads((Path(root) / "config.json").read_text(encoding="utf-8")).get("command") == "train-cnn"
    except (OSError, ValueError, AttributeError):
        return False


def is_finished(run: RunPaths) -> bool:
    """train-cnn writes cnn/metrics.json last, and removes it first when it starts a run over."""
    return run.cnn_metrics.is_file()
