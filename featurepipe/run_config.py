"""What a finished run holds, typed and read once: `RunConfig.load(paths)`.

config.json is written by train-cnn (its layout unchanged, so runs of every earlier version load);
here it becomes frozen dataclasses, and the checks every later command makes of a run live here
once: that its training finished, which heads are fitted, and that a head was fitted on features of
the run's current checkpoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from featurepipe.errors import FeaturepipeError
from featurepipe.files import read_json, require
from featurepipe.models import fingerprint
from featurepipe.runs import (FROZEN_STEM, CrossvalPaths, RunPaths, fold_command, frozen_label, is_crossval, is_finished,
                              is_frozen, train_advice)


@dataclass(frozen=True)
class DataConfig:
    """Where the run's images came from. Runs older than a field have its default."""

    class_names: list[str]
    source: str | None = None
    kind: str | None = None
    fingerprint: str | None = None  # of ids, labels and contents (data.fingerprint.data_fingerprint)
    index_fingerprint: str | None = None  # of ids, labels and classes only
    counts: dict[str, list[int]] = field(default_factory=dict)  # images per class, per split
    # Is test the source's own split (else featurepipe drew it from the pool val came from)? None: unknown.
    test_given: bool | None = None


@dataclass(frozen=True)
class TrainSettings:
    """The train-cnn options later commands depend on (config.json's "train" holds them all)."""

    seed: int = 0
    allow_outside: bool = False
    monitor: str | None = None  # None: a run older than --monitor, which always kept the best epoch
    class_names: str | None = None  # --class-names: every later scan of the source names its classes so
    folds: int = 1  # --folds K > 1: the checkpoint is one fold's model, trained on most of val's images

    def scan(self, source: str):
        """The run's data source read again, its classes named as in training."""
        from featurepipe import data as fdata

        return fdata.name_classes(fdata.scan(source, self.allow_outside), self.class_names)


@dataclass(frozen=True)
class ModelConfig:
    """The checkpoint's meta: what the CNN takes as input."""

    arch: str
    img_size: int
    in_channels: int


@dataclass(frozen=True)
class RunConfig:
    paths: RunPaths
    data: DataConfig
    train: TrainSettings
    model: ModelConfig | None  # None in runs (and test fixtures) that have only the CNN's predictions
    sections: dict[str, Any]  # config.json as read: check_same_data and the report's listing take it whole

    @classmethod
    def load(cls, paths: RunPaths) -> "RunConfig":
        """The config of a finished run: one whose training was interrupted is refused (see is_finished)."""
        if is_crossval(paths.root):
            raise FeaturepipeError(f"--run {paths.root}: is a cross-validation, not a run; give one of its folds "
                                   f"(--run {CrossvalPaths(paths.root).fold(1).root}, ...), or pool them with featurepipe compare "
                                   f"--run {paths.root}")
        require(paths.config, "run config", train_advice(paths.root))
        raw = read_json(paths.config)
        if not is_finished(paths):
            raise FeaturepipeError(
                f"{paths.root}: its training did not finish (no {paths.cnn_metrics}); continue it with "
                + (fold_command(paths.root) or f"featurepipe train-cnn --data {raw.get('data', {}).get('source', 'SRC')} "
                                               f"--out {paths.root} --resume"))
        return cls.parse(paths, raw)

    @classmethod
    def parse(cls, paths: RunPaths, raw: dict[str, Any]) -> "RunConfig":
        data, train, model = raw["data"], raw.get("train", {}), raw.get("model")
        return cls(
            paths,
            DataConfig(data["class_names"], data.get("source"), data.get("kind"), data.get("fingerprint"),
                       data.get("index_fingerprint"), data.get("counts", {}), data.get("test_given")),
            TrainSettings(train.get("seed", 0), train.get("allow_outside", False), train.get("monitor"),
                          train.get("class_names"), train.get("folds", 1)),
            None if model is None else ModelConfig(model["arch"], model["img_size"], model["in_channels"]),
            raw,
        )

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def seed(self) -> int:
        return self.train.seed

    @functools.cached_property
    def checkpoint(self) -> str:
        """The fingerprint of the run's checkpoint now: what everything derived from it records."""
        return fingerprint(require(self.paths.checkpoint, "trained CNN", train_advice(self.paths.root, self.data.source)))

    @property
    def weights(self) -> str | None:
        """The pretrained weights the CNN started from (None: from scratch): whether a frozen arm exists."""
        return self.sections.get("train", {}).get("resolved", {}).get("weights")

    def val_held_out(self, name: str) -> bool:
        """Are `name`'s val predictions of images its model never learned from? Not for the heads on a --folds
        run's features: the fold model that embeds them trained on most of val. The CNN's val predictions there
        are its folds' out-of-fold ones, and the frozen backbone never saw val."""
        return self.train.folds == 1 or name == "cnn" or is_frozen(name)

    def fitted_heads(self) -> list[str]:
        """Every head fit-heads has written (stack included), by name, frozen-features heads by their label:
        those with the .skops file featurepipe loads and their json (a .joblib alone is never loaded, so it is
        no head)."""
        heads = self.paths.heads
        if not heads.exists():
            return []
        stems = sorted(p.stem for p in heads.glob("*.skops") if self.paths.head_info(p.stem).is_file())
        return [frozen_label(s[:-len(FROZEN_STEM)], self.weights) if s.endswith(FROZEN_STEM) else s for s in stems]

    def head_info(self, name: str) -> dict[str, Any]:
        """A fitted head's json, refused when it was fitted on features of another checkpoint than the current."""
        paths = self.paths
        require(paths.head_safe(name), f"fitted head '{name}'", f"run featurepipe fit-heads --run {paths.root} "
                                                                  f"--heads {name} first")
        info = read_json(require(paths.head_info(name), "head info", f"re-run featurepipe fit-heads --heads {name}"))
        if info.get("checkpoint") != self.checkpoint:
            raise FeaturepipeError(
                f"{paths.head_safe(name)}: fitted on features of an older checkpoint; "
                f"re-run featurepipe extract and fit-heads --run {paths.root}"
            )
        # The label says which arm; only the features' own attribute says which backbone embedded them.
        if bool(info.get("features", {}).get("frozen")) != is_frozen(name):
            raise FeaturepipeError(
                f"{paths.head_safe(name)}: fitted on {'fine-tuned' if is_frozen(name) else 'frozen'} features, "
                f"not the {'frozen' if is_frozen(name) else 'fine-tuned'} ones its name says; "
                f"re-run featurepipe extract and fit-heads --run {paths.root}"
            )
        return info
