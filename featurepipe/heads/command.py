"""`featurepipe fit-heads`: every head named, fitted on the run's train features, saved with its scores."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions
from featurepipe.features import FeatureSplit, open_split, read_attrs
from featurepipe.files import require
from featurepipe.heads.files import write_head
from featurepipe.heads.fitting import TUNE, SkipHead, choose, fit_chosen, jsonable, one_thread_per_job, predict_proba
from featurepipe.heads.online import choose_online, fit_online
from featurepipe.heads.registry import HEADS, NYSTROEM, ONLINE, STACK
from featurepipe.heads.stack import fit_stack
from featurepipe.progress import log, progress_bar
from featurepipe.run_config import RunConfig
from featurepipe.runs import RunPaths, frozen_label, run_paths


@dataclass
class HeadsConfig:
    """Options of fit-heads."""

    tune: str = "val"
    jobs: int = -1
    out_of_core: bool = False  # also switched on when the train features exceed memory_bytes
    chunk_rows: int = 50_000
    svm_exact_limit: int = 20_000
    memory_bytes: int = field(default_factory=lambda: _physical_memory() // 4)

    def validate(self) -> None:
        if self.tune not in TUNE:
            raise FeaturepipeError(f"--tune {self.tune}: choose one of {', '.join(TUNE)}")
        if self.chunk_rows < 1:
            raise FeaturepipeError(f"--chunk-rows {self.chunk_rows}: must be at least 1")
        if self.jobs == 0:
            raise FeaturepipeError("--jobs 0: give a number of parallel jobs, or -1 for all cores")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def check_features(cfg: RunConfig, path: Path | None = None) -> dict[str, Any]:
    """The attributes of features.h5 (or `path`), refused unless they belong to the run's current checkpoint
    and classes, and come from the pretrained backbone exactly where `path` is the frozen arm's file."""
    paths = cfg.paths
    path = path or paths.features
    frozen = path == paths.frozen_features
    require(path, "features file", f"run featurepipe extract --run {paths.root} first")
    attrs = read_attrs(path)
    if attrs["checkpoint"] != cfg.checkpoint:
        raise FeaturepipeError(
            f"{path}: extracted from another checkpoint than {paths.checkpoint}; "
            f"re-run featurepipe extract --run {paths.root}"
        )
    if attrs["class_names"] != cfg.class_names:
        raise FeaturepipeError(f"{path}: its classes differ from the run's; re-run featurepipe extract")
    # The same checkpoint embeds any source (extract --data X --out F): a copy of F over features.h5 would fit
    # the heads on X's images and score them on X's test split, whose ids an .npz's may share.
    if cfg.data.source is not None and attrs.get("source", cfg.data.source) != cfg.data.source:
        raise FeaturepipeError(f"{path}: holds features of {attrs['source']}, not of the run's data "
                               f"{cfg.data.source}; re-run featurepipe extract --run {paths.root}")
    # A file's name is no proof of what it holds: a features.h5 copied over features.frozen.h5 would be
    # fitted and reported as the frozen arm. extract marks the frozen pass's file.
    if bool(attrs.get("frozen")) != frozen:
        raise FeaturepipeError(
            f"{path}: holds {'the frozen backbone' if attrs.get('frozen') else 'the fine-tuned CNN'}'s features, "
            f"not {'the frozen' if frozen else 'the fine-tuned'} ones; re-run featurepipe extract --run {paths.root}"
        )
    return attrs


def fit_heads(run: str | Path, names: list[str], config: HeadsConfig | None = None) -> dict[str, dict[str, float]]:
    """Every head of `names` on features.h5; where the CNN started from pretrained weights, every head but
    stack also on the frozen backbone's features (features.frozen.h5, written by extract), under its
    frozen label."""
    config = config or HeadsConfig()
    config.validate()
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    base = [n for n in names if n != STACK]
    arms = [(paths.features, str)]
    if cfg.weights is not None and base:
        require(paths.frozen_features, "frozen features file",
                f"the CNN started from {cfg.weights} weights; re-run featurepipe extract --run {paths.root}")
        arms.append((paths.frozen_features, lambda name: frozen_label(name, cfg.weights)))
    results = {}
    for k, (path, label) in enumerate(arms):
        last = k == len(arms) - 1  # stack last: it combines the heads of both arms
        results |= _fit_arm(cfg, path, base, label, config, [STACK] if last and STACK in names else [])
    return results


def _fit_arm(cfg: RunConfig, path: Path, base: list[str], label, config: HeadsConfig,
             stack: list[str]) -> dict[str, dict[str, float]]:
    """The heads `base` on the features in `path`, saved as `label(name)`; then stack if `stack` names it."""
    paths = cfg.paths
    attrs = check_features(cfg, path)
    class_names, seed, current = cfg.class_names, cfg.seed, cfg.checkpoint
    held_out = not base or cfg.val_held_out(label(base[0]))
    if config.tune == "val" and not held_out:
        log(f"{paths.root} is a --folds run whose CNN trained on val's images: the heads' hyperparameters are "
            "chosen by cross-validation on train (--tune cv) instead")
        config = replace(config, tune="cv")
    names = [*base, *stack]
    results = {}
    with open_split(path, "train") as train, open_split(path, "val") as val, open_split(path, "test") as test:
        n, dim = train.features.shape
        out_of_core = config.out_of_core or n * dim * 4 > config.memory_bytes
        if out_of_core and base:
            offline = [h for h in base if HEADS[h].online is None]
            if offline:
                raise FeaturepipeError(
                    f"--heads {','.join(offline)}: need the train features in memory ({n}×{dim} float32, "
                    f"{n * dim * 4 / 2**30:.1f} GiB); out-of-core only {', '.join(h for h in HEADS if HEADS[h].online)} fit"
                )
            log(f"out-of-core: {n}×{dim} train features, partial_fit over chunks of {config.chunk_rows} rows")
        else:
            train, val, test = (FeatureSplit(s.features[:], s.labels, s.ids) for s in (train, val, test))
        common = {"checkpoint": current, "seed": seed, "class_names": class_names, "n_train": n,
                  "features": {"arch": attrs["arch"], "layer": attrs["layer"], "tta": attrs["tta"], "dim": dim,
                               **({"frozen": attrs["frozen"]} if "frozen" in attrs else {})},
              **({} if held_out else {"val_held_out": False})}
        with progress_bar("head") as bar, one_thread_per_job():
            task = bar.add_task("fit heads" + (" (frozen features)" if "frozen" in attrs else ""), total=len(names),
                                info="")
            for name in base:
                bar.update(task, info=name)
                t0 = time.perf_counter()
                try:
                    model, info = _fit_one(name, train, val, path, len(class_names), seed, config, out_of_core)
                except SkipHead as e:
                    log(f"{label(name)}: skipped: {e}")
                    bar.advance(task)
                    continue
                fit_seconds = time.perf_counter() - t0
                results[label(name)] = _save_head(paths, label(name), model, info | common, fit_seconds, val, test,
                                                  class_names, config.chunk_rows)
                bar.advance(task)
            if STACK in names:
                bar.update(task, info=STACK)
                try:
                    results[STACK] = fit_stack(cfg, val, test, config.tune, config.jobs)
                except SkipHead as e:
                    log(f"{STACK}: skipped: {e}")
                bar.advance(task)
    return results


def _fit_one(name: str, train: FeatureSplit, val: FeatureSplit, path: Path, n_classes: int, seed: int,
             config: HeadsConfig, out_of_core: bool) -> tuple[Pipeline, dict[str, Any]]:
    spec, info = HEADS[name], {"head": name, "tuned_on": config.tune, "out_of_core": out_of_core}
    n = len(train.labels)
    if out_of_core:
        spec = ONLINE[spec.online]
        classes = np.arange(n_classes)
        params, table = choose_online(spec, path, classes, config.tune, seed, config.jobs, config.chunk_rows)
        info["chunk_rows"] = config.chunk_rows
        model = fit_online(spec, params, train, classes, seed, config.chunk_rows)
    else:
        if name == "svm" and n > config.svm_exact_limit:
            spec = NYSTROEM
        params, table, model = choose(spec, train.features, train.labels, val.features, val.labels, config.tune,
                                      seed, config.jobs)
        if model is None:
            model = fit_chosen(spec, params, train.features, train.labels, seed, config.jobs)
    if "kernel" in model.named_steps:
        reason = "out-of-core" if out_of_core else f"{n} training vectors > {config.svm_exact_limit}"
        components = model.named_steps["kernel"].n_components
        info["approximation"] = {"method": "nystroem", "n_components": components, "reason": reason,
                                 "n_train": n, "exact_limit": config.svm_exact_limit}
        log(f"{name}: Nystroem kernel approximation ({components} components) + linear SVM instead of the "
            f"exact RBF SVM ({reason})")
    info.update(params=jsonable(params), candidates=table, grid=jsonable(spec.grid) if table else {})
    return model, info


def _save_head(paths: RunPaths, name: str, model, info: dict[str, Any], fit_seconds: float, val: FeatureSplit,
               test: FeatureSplit, class_names: list[str], chunk_rows: int) -> dict[str, float]:
    k = len(class_names)
    val_pred = Predictions(val.ids, val.labels, predict_proba(model, val.features, k, chunk_rows), class_names)
    t0 = time.perf_counter()
    proba = predict_proba(model, test.features, k, chunk_rows)
    predict_seconds = time.perf_counter() - t0
    test_pred = Predictions(test.ids, test.labels, proba, class_names)
    return write_head(paths, name, model, info, fit_seconds, predict_seconds, val_pred, test_pred)
