"""`featurepipe crossval`: the whole comparison cross-validated, so that every image is tested once.

A single 15 % test split of a few hundred images decides almost nothing (38 images: a handful of
discordant pairs) and another seed's split tells another story. Here the images are cut into k
stratified folds (groups kept whole, as in every split featurepipe makes); fold K is the test split of
run DIR/foldK, whose val split is carved from the rest as in a single run, and each run goes through
the four stages exactly as the single commands do (train-cnn, extract, fit-heads, compare), so every
other command works on it. `compare --run DIR` then pools the out-of-fold predictions
(report/pooled.py).

Resuming is re-running the command: a stage whose result is already there (metrics.json, features of
the current checkpoint, heads fitted on them, the fold's report) is not done again, and a fold whose
training was interrupted continues from its last epoch (train-cnn --resume), so Ctrl-C loses at most
the stage in progress.

Folds are jobs: any number of crossval commands (a job array's, --fold K; or the --fold-workers
processes of one) share the folder through its locks, each taking the folds no other holds, and the
one that finishes the last fold pools them. The plan binds them all; nothing depends on the order.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe.data.cache import memory_bytes
from featurepipe.data.fingerprint import data_fingerprint
from featurepipe.device import choose_precision, resolve_device
from featurepipe.engine import Callback
from featurepipe.errors import FeaturepipeError
from featurepipe.extract import extract
from featurepipe.features import read_attrs
from featurepipe.files import create_json, read_json, write_json
from featurepipe.heads import HeadsConfig, fit_heads
from featurepipe.heads.registry import STACK
from featurepipe.options import TrainConfig
from featurepipe.progress import log, progress_bar
from featurepipe.report import CompareOptions
from featurepipe.report.command import compare
from featurepipe.report.pooled import check_fold, compare_crossval, fold_done
from featurepipe.run_config import RunConfig
from featurepipe.runs import (Busy, CrossvalPaths, environment, frozen_label, is_crossval, is_finished, read_plan,
                              run_lock)
from featurepipe.train import train

STAGES = ("train-cnn", "extract", "fit-heads", "compare")
# Options that may change between a cross-validation's first start and its continuation: they change
# how fast it runs, or what happens to an unreadable image, not what a fold computes.
MAY_CHANGE = ("device", "amp", "on_bad_image", "resume", "overwrite")
CROSSVAL_MAY_CHANGE = ("jobs",)


@dataclass
class CrossvalConfig:
    """crossval's own options (train-cnn's are a TrainConfig beside it)."""

    folds: int = 5
    heads: tuple[str, ...] = ("svm", "rf", "logreg")
    tune: str = "val"
    jobs: int = -1
    bootstrap: int = 2000

    def validate(self) -> None:
        if self.folds < 2:
            raise FeaturepipeError(f"--folds {self.folds}: a cross-validation needs at least 2 folds")
        HeadsConfig(tune=self.tune, jobs=self.jobs).validate()
        CompareOptions(resamples=self.bootstrap).validate()


def parse_folds(text: str | None) -> list[int]:
    """--fold 3 or --fold 2,4."""
    if text is None:
        return []
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise FeaturepipeError(f"--fold {text}: give fold numbers, e.g. 3 or 2,4") from None


def fold_splits(catalog: fdata.Catalog, folds: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Catalog indices of train, val and test for each fold: the test folds partition every image,
    stratified by class (and by group, each group in one fold, where the source has groups); val is a
    stratified 15 % of all images carved from the rest, as a single run's."""
    labels = catalog.labels
    fewest = int(np.bincount(labels, minlength=len(catalog.class_names)).min())
    if fewest < folds + 2:  # every fold's test, val and train need an image of every class
        if fewest < 4:
            raise FeaturepipeError(f"--data {catalog.source}: its smallest class has {fewest} image(s); it cannot be "
                                   "cross-validated: every class needs 4 (test images for 2 folds, a val and a "
                                   "train image)")
        raise FeaturepipeError(f"--folds {folds}: the smallest class of {catalog.source} has {fewest} image(s); "
                               f"use at most {fewest - 2} folds")
    groups = None if catalog.groups is None else np.asarray(catalog.groups)
    everything = np.arange(len(catalog))
    parts = fdata.splits.kfold(labels, folds, seed, groups, f"{catalog.source} holds")
    out = []
    for _, test in parts:
        rest = np.setdiff1d(everything, test)
        val_share = fdata.splits.VAL_FRACTION * len(everything) / len(rest)
        part = fdata.splits.stratified_split(labels[rest], {"val": val_share}, seed, rest="train",
                                             groups=None if groups is None else groups[rest])
        out.append({"train": rest[part["train"]], "val": rest[part["val"]], "test": np.sort(test)})
    return out


def crossval(data: str, out: str | Path, cfg: TrainConfig, config: CrossvalConfig,
             callbacks: Sequence[Callback] = (), only: Sequence[int] = (), workers: int = 1,
             pool: bool = True, strict: bool = True) -> dict[str, Any] | None:
    """Run (or continue) the cross-validation in `out`: the folds in `only` (default all) that no other
    job holds, in this process or in `workers` processes; then, where every fold is finished, the pooled
    comparison, whose summary it returns (None where folds are left to other jobs, or `pool` is off).
    A fold named in `only` that another job holds is refused, unless not `strict` (fold workers share
    their list). `callbacks` join every fold's training (tests interrupt it through them)."""
    cfg.validate()
    config.validate()
    if workers < 1:
        raise FeaturepipeError(f"--fold-workers {workers}: must be at least 1")
    bad = [k for k in only if not 1 <= k <= config.folds]
    if bad:
        raise FeaturepipeError(f"--fold {bad[0]}: choose folds among 1..{config.folds} (--folds {config.folds})")
    # What the first fold would refuse later (the device, FEATUREPIPE_* values) is refused before the plan.
    choose_precision(resolve_device(cfg.device), cfg.amp)
    memory_bytes()
    paths = CrossvalPaths(Path(out))
    catalog = fdata.name_classes(fdata.scan(data, cfg.allow_outside), cfg.class_names)
    splits = [{s: [catalog.ids[i] for i in idx] for s, idx in fold.items()}
              for fold in fold_splits(catalog, config.folds, cfg.seed)]
    folds = list(dict.fromkeys(only)) or list(range(1, config.folds + 1))
    wanted = iter(folds)
    # The plan is read or written, and this job's first fold taken, by one job at a time: once any fold
    # has started, the plan binds every other job.
    with run_lock(paths.root, "--out", create=True, wait=True):
        plan = _plan(paths, catalog, cfg, config, [fold["test"] for fold in splits])
        if [fold["test"] for fold in splits] != plan["test_ids"]:
            raise FeaturepipeError(f"--out {paths.root}: its folds ({paths.plan}) differ from the ones {data} gives "
                                   "now; the data changed, so give a new --out")
        held = _take(paths, wanted, strict=strict and bool(only)) if workers == 1 else None
    if workers > 1:
        run_workers(workers, data, paths.root, cfg, config, folds if only else [])
    else:
        train_cfg = replace(cfg, folds=1, resume=False, overwrite=False)
        with progress_bar("stage") as bar:
            task = bar.add_task("crossval", total=len(folds) * len(STAGES), info="")
            while held is not None:
                k, lock = held
                try:
                    _fold(data, paths, k, plan, train_cfg, config, splits[k - 1], callbacks,
                          lambda stage: bar.update(task, info=f"fold {k}/{config.folds}: {stage}"),
                          lambda: bar.advance(task))
                finally:
                    lock.__exit__(None, None, None)
                held = _take(paths, wanted, strict=strict and bool(only))
    return pool_when_done(paths, config) if pool else None


def _take(paths: CrossvalPaths, wanted: Iterator[int], strict: bool):
    """The next fold of `wanted` that no other job holds, and its lock, held (None: none left). A fold
    another job holds is its to finish: skipped, or refused where the job was asked for it by name."""
    for k in wanted:
        lock = run_lock(paths.fold(k).root, "--out", create=True)
        try:
            lock.__enter__()
        except Busy:
            if strict:
                raise FeaturepipeError(f"--fold {k}: another job is running it ({paths.fold(k).root} is locked); "
                                       "each fold is one job's") from None
            continue
        return k, lock
    return None


def run_workers(n: int, data: str, root: Path, cfg: TrainConfig, config: CrossvalConfig, only: list[int]) -> None:
    """`n` processes taking the plan's folds one by one (crossval's own queue: a fold one holds, the others
    skip), each pinned to its own GPU or its share of this process's cores; returns once all have ended.
    Each fold is computed as in one process: the same seed, the same data, one model."""
    ctx = multiprocessing.get_context("spawn")  # nothing of this process's CUDA or thread pools inherited
    procs = [ctx.Process(target=_worker, args=(pin, data, str(root), cfg, config, only), name=f"fold worker {i}")
             for i, pin in enumerate(worker_pins(n, cfg.device), start=1)]
    for p in procs:
        p.start()
    for p in procs:  # Ctrl-C reaches the workers too (one process group): each stops as crossval does
        p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise FeaturepipeError(f"--fold-workers {n}: {', '.join(failed)} stopped (its error is above); finished "
                               "stages are kept: run the same command again to continue")


def worker_pins(n: int, device: str) -> list[dict[str, Any]]:
    """Worker i's GPU (CUDA_VISIBLE_DEVICES, round robin over the visible ones) and its share of the cores
    this process may use (its threads and its data-loading processes stay there)."""
    cores = sorted(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1))
    share = max(1, len(cores) // n)
    pins = [{"cores": [cores[(i * share + j) % len(cores)] for j in range(share)], "env": {}} for i in range(n)]
    if resolve_device(device).type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if n > len(gpus):
            log(f"warning: --fold-workers {n} on {len(gpus)} GPU(s): some workers share a GPU")
        for i, pin in enumerate(pins):
            pin["env"]["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    return pins


def _worker(pin: dict[str, Any], data: str, root: str, cfg: TrainConfig, config: CrossvalConfig,
            only: list[int]) -> None:
    os.environ.update(pin["env"], OMP_NUM_THREADS=str(len(pin["cores"])))  # before anything starts CUDA
    if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the thread count alone shares the cores
        os.sched_setaffinity(0, pin["cores"])
    torch.set_num_threads(len(pin["cores"]))
    try:
        crossval(data, root, cfg, config, only=only, pool=False, strict=False)
    except FeaturepipeError as e:
        print(f"featurepipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def pool_when_done(paths: CrossvalPaths, config: CrossvalConfig) -> dict[str, Any] | None:
    """The pooled comparison, written where every fold is finished and no other job is writing it; else
    what is left and who pools, in the log."""
    left = [paths.fold(k).root.name for k in range(1, config.folds + 1) if not fold_done(paths.fold(k))]
    if left:
        log(f"{', '.join(left)} of {paths.root} not finished yet (other jobs', or still to run): the job that "
            f"finishes the last fold pools them, or featurepipe compare --run {paths.root} once all are done")
        return None
    try:
        with run_lock(paths.root, "--out"):
            return compare_crossval(paths.root, None, CompareOptions(resamples=config.bootstrap))
    except Busy:
        log(f"another job is pooling the folds of {paths.root}")
        return None


def _plan(paths: CrossvalPaths, catalog: fdata.Catalog, cfg: TrainConfig, config: CrossvalConfig,
          test_ids: list[list[str]]) -> dict[str, Any]:
    """crossval.json: written before the first fold; a continuation must match it. Until a fold has
    started (its folder exists) nothing has been computed under it, so a re-run with other options
    replaces it: a run refused before its first fold (a bad environment value, a full disk) does not
    bind the next."""
    plan = {
        "command": "crossval",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"source": catalog.source, "kind": catalog.kind, "class_names": catalog.class_names,
                 "index_fingerprint": data_fingerprint(catalog, contents=False), "images": len(catalog)},
        "crossval": {k: v for k, v in {**asdict(config), "heads": list(config.heads)}.items()
                     if k not in CROSSVAL_MAY_CHANGE},
        "train": {k: v for k, v in asdict(cfg).items() if k not in MAY_CHANGE},
        "seed": cfg.seed,
        "test_ids": test_ids,
        "environment": environment(),
    }
    if is_crossval(paths.root):
        old = read_plan(paths.root)
        differ = _differences(old, plan)
        if not differ:
            log(f"continuing the cross-validation in {paths.root}")
            return old
        if any(paths.fold(k).root.exists() for k in range(1, len(old.get("test_ids", [])) + 1)):
            what, diff = differ
            raise FeaturepipeError(f"--out {paths.root}: holds a cross-validation with other {what} "
                                   f"({', '.join(diff)}); continue it with the same ones, or give a new --out")
        log(f"replacing the plan in {paths.root}: none of its folds had started")
        write_json(paths.plan, plan)
        return plan
    others = sorted(p.name for p in paths.root.iterdir() if p.name != ".lock") if paths.root.is_dir() else []
    if others:
        raise FeaturepipeError(f"--out {paths.root}: holds other files ({', '.join(others[:3])}) and is no "
                               "cross-validation; give a new or empty folder")
    if not create_json(paths.plan, plan):  # another job's, written since: where the lock does not hold (NFS)
        return _plan(paths, catalog, cfg, config, test_ids)
    return plan


def _differences(old: dict[str, Any], plan: dict[str, Any]) -> tuple[str, list[str]] | None:
    """What differs between two plans, by section, where the folds they make would differ (None: nothing).
    A plan written before an option could change keeps it; it is left out of the comparison."""
    for key, what in (("data", "data"), ("crossval", "cross-validation options"), ("train", "train-cnn options")):
        ignored = {"data": ("source",), "crossval": CROSSVAL_MAY_CHANGE}.get(key, ())
        mine = {k: v for k, v in plan[key].items() if k not in ignored}
        theirs = {k: v for k, v in old.get(key, {}).items() if k not in ignored}
        if mine != theirs:
            return what, sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    return None


def _fold(data: str, paths: CrossvalPaths, k: int, plan: dict[str, Any], cfg: TrainConfig, config: CrossvalConfig,
          splits: dict[str, list[str]], callbacks: Sequence[Callback], show, done) -> None:
    """The four stages on one fold, each skipped where its result is already there; the caller holds the
    fold's lock."""
    run = paths.fold(k)
    if run.config.exists():  # what is there must be this plan's fold before anything is kept or continued
        check_fold(paths, k, plan)
    show("train-cnn")
    if not (is_finished(run) and run.checkpoint.is_file()):
        # A fold that lost its checkpoint is trained again, from the start: the seed gives the same model.
        resume = not is_finished(run) and run.last_checkpoint.exists() and run.config.exists()
        train(data, run.root, replace(cfg, resume=resume, overwrite=not resume), callbacks, splits=splits)
    done()
    show("extract")
    run_cfg = RunConfig.load(run)
    if not _features_current(run_cfg):
        extract(run.root, device=cfg.device, amp=cfg.amp)
    done()
    show("fit-heads")
    if not _heads_current(run_cfg, config.heads):
        fit_heads(run.root, list(config.heads), HeadsConfig(tune=config.tune, jobs=config.jobs))
    done()
    show("compare")
    summary = run.compare / "summary.json"
    heads = [run.head_info(h) for h in run_cfg.fitted_heads()]
    if not summary.exists() or any(h.stat().st_mtime > summary.stat().st_mtime for h in heads):
        # Grad-CAM is left to the user (compare --run DIR/foldK): minutes on a CPU, for each fold.
        compare(run.root, options=CompareOptions(resamples=config.bootstrap, gradcam=False))
    done()


def _features_current(cfg: RunConfig) -> bool:
    wanted = [cfg.paths.features] + ([cfg.paths.frozen_features] if cfg.weights is not None else [])
    return all(p.exists() and _is_current(read_attrs(p), cfg, frozen=p == cfg.paths.frozen_features) for p in wanted)


def _is_current(attrs: dict, cfg: RunConfig, frozen: bool) -> bool:
    return attrs["checkpoint"] == cfg.checkpoint and bool(attrs.get("frozen")) == frozen


def _heads_current(cfg: RunConfig, heads: Sequence[str]) -> bool:
    labels = list(heads)
    if cfg.weights is not None:
        labels += [frozen_label(h, cfg.weights) for h in heads if h != STACK]
    return all(cfg.paths.head_info(h).exists() and read_json(cfg.paths.head_info(h)).get("checkpoint") == cfg.checkpoint
               for h in labels)
