"""train-cnn's run folder: whether --out may be trained into, what --resume continues with, and what
a run trained again forgets first."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any

from featurepipe import data as fdata
from featurepipe.data.fingerprint import data_fingerprint
from featurepipe.errors import FeaturepipeError
from featurepipe.files import read_json, require
from featurepipe.options import TrainConfig
from featurepipe.progress import log
from featurepipe.runs import RunPaths, crossval_command, crossval_holding, is_finished, is_run

# Options a resumed run must share with its first start (device, amp and --on-bad-image may change).
RESUME_KEEPS = ("arch", "weights", "epochs", "freeze_epochs", "batch_size", "img_size", "lr", "lr_backbone_ratio",
                "weight_decay", "label_smoothing", "augment", "sampler", "monitor", "patience", "ema", "folds", "seed",
                "class_names")


def _resumable(run: RunPaths) -> bool:
    return run.last_checkpoint.exists() or any(run.root.glob("folds/*/cnn/last.pt"))


def check_run_dir(run: RunPaths, data: str, cfg: TrainConfig, fold: bool = False) -> TrainConfig:
    """The options to train with: as given, or on --resume the run's own where one is left out. Only
    crossval (`fold`) trains inside a cross-validation: a run of another split or other data there would
    be pooled as a fold, or make the plan's folder no cross-validation."""
    cv = crossval_holding(run.root)
    if cv is not None and not fold:
        raise FeaturepipeError(f"--out {run.root}: is inside the cross-validation {cv}, where train-cnn never writes "
                               f"(its folds are trained by {crossval_command(cv)}); give another --out")
    if cfg.resume:
        if not _resumable(run):
            raise FeaturepipeError(f"--resume: {run.last_checkpoint} does not exist; start the run without --resume")
        old = read_json(require(run.config, "run config", "start the run over without --resume"))
        if old["data"]["source"] not in (data, str(Path(data).expanduser())):
            # Moved data are fine; other data are not (the fingerprint tells them apart).
            catalog = fdata.name_classes(fdata.scan(data, cfg.allow_outside), cfg.class_names)
            if data_fingerprint(catalog) != old["data"].get("fingerprint"):
                raise FeaturepipeError(f"--resume: {run.root} was trained on {old['data']['source']}, not {data}")
            log(f"warning: {run.root} was trained on {old['data']['source']}; {data} holds the same data")
        return _resumed_options(cfg, old["train"])
    if (is_finished(run) or _resumable(run)) and not cfg.overwrite:
        raise FeaturepipeError(
            f"--out {run.root}: already holds a trained CNN; pass --overwrite to replace it, or --resume to continue"
        )
    others = sorted(p.name for p in run.root.iterdir() if p.name != ".lock") if run.root.is_dir() else []
    if others and not is_run(run.root) and not cfg.overwrite:
        raise FeaturepipeError(f"--out {run.root}: holds other files ({', '.join(others[:3])}"
                               f"{', ...' if len(others) > 3 else ''}) and is no featurepipe run; give a new or "
                               "empty folder, or pass --overwrite")
    return cfg


def _resumed_options(cfg: TrainConfig, old: dict[str, Any]) -> TrainConfig:
    """Options left out take the run's; one given otherwise than the run had is refused."""
    # An option at its default was left out as far as anyone can tell (--seed's is 0, --monitor's none,
    # --arch's auto): read as given, the command an unfinished run's message gives (--data, --out, --resume)
    # was refused for every run trained with another seed, --monitor or --ema.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    left_out = {k for k in RESUME_KEEPS if getattr(cfg, k) in (None, defaults[k])}
    cfg = replace(cfg, **{k: old[k] for k in left_out if k in old})
    for k in RESUME_KEEPS:
        was = old.get(k) if old.get(k) is not None else old.get("resolved", {}).get(k)
        # An option the run left to auto may be given as what auto chose (--arch efficientnet_lite0).
        if k in old and getattr(cfg, k) is not None and getattr(cfg, k) not in (was, old.get("resolved", {}).get(k)):
            raise FeaturepipeError(f"--resume: --{k.replace('_', '-')} {getattr(cfg, k)} differs from the run's {was}; "
                                   "resume with the run's options, or start over with --overwrite")
    return cfg


def start_over(run: RunPaths) -> None:
    """A run trained again forgets that it was finished and where it stopped, before anything else is
    written: an interrupted --overwrite must neither pass for finished nor resume the previous run."""
    for path in (run.cnn_metrics, run.last_checkpoint, *run.root.glob("folds/*/cnn/last.pt"),
                 *run.root.glob("folds/*/cnn/metrics.json")):
        path.unlink(missing_ok=True)
