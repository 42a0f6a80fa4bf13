"""What varies between fits, as `engine.Callback`s: train.fit picks the ones a run's options ask for.

Under torchrun every rank runs every callback, so all keep the same state; the ones that write files
write from rank 0 alone (the others read what it wrote, e.g. model.pt after the fit).
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featurepipe import distributed
from featurepipe.engine import Callback, Trainer
from featurepipe.errors import FeaturepipeError, first_line
from featurepipe.files import write_text
from featurepipe.models import save_checkpoint
from featurepipe.progress import log, progress_bar
from featurepipe.runs import RunPaths


class EMA(Callback):
    """Exponential moving average of the weights (and batch-norm statistics) over the last ~5 % of
    steps: what is validated and kept.

    Small medical validation sets swing from epoch to epoch with the last few batches; the average
    of recent weights is steadier and generalises better. Its horizon scales with the schedule, so a
    two-epoch run is not judged on weights from its first, untrained steps.
    """

    def __init__(self, net: torch.nn.Module, total_steps: int) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        decay = 1.0 - 1.0 / max(2.0, total_steps / 20)
        self.averaged = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.evaluated = self.averaged.module

    def on_step_end(self, trainer: Trainer) -> None:
        self.averaged.update_parameters(trainer.net)


class FreezePhase(Callback):
    """Phase 1 trains the new head on a frozen backbone for `freeze_epochs`, phase 2 everything
    (fastai's fine_tune), and each extension of the schedule (Extend) is one more phase of its own;
    `build(phase, epochs, lr_scale)` makes a phase's optimizer and schedule."""

    def __init__(self, freeze_epochs: int, epochs: int,
                 build: Callable[[str, int, float], tuple[torch.optim.Optimizer, Any]]) -> None:
        self.freeze_epochs, self.epochs, self.build, self.phase = freeze_epochs, epochs, build, None

    def on_epoch_start(self, trainer: Trainer) -> None:
        phase = self.phase_of(trainer)
        if phase != self.phase:
            self.phase = phase
            name, epochs, lr_scale, _ = phase
            trainer.optimizer, trainer.scheduler = self.build(name, epochs, lr_scale)
            trainer.frozen = name == "head"

    def phase_of(self, trainer: Trainer) -> tuple[str, int, float, int]:
        """(name, epochs, share of the peak learning rate, first epoch) of the phase trainer.epoch is in."""
        if trainer.epoch <= self.freeze_epochs:
            return "head", self.freeze_epochs, 1.0, 1
        started = [e for e in trainer.state.get("extensions", []) if trainer.epoch >= e["start"]]
        if started:
            e = started[-1]
            return "all", e["epochs"], e["lr_scale"], e["start"]
        return "all", self.epochs, 1.0, self.freeze_epochs + 1


class Extend(Callback):
    """Where the schedule ends with the model still learning (`still_learning`, from the validation
    losses of its last phase), one more, shorter cycle from the final weights, at most `most` times
    (see defaults.py for the rule and its measurements). The final weights stay what is kept: only
    the length of training depends on val, never which weights are kept. Goes before ResumeState,
    which saves the lengthened schedule."""

    def __init__(self, phases: FreezePhase, still_learning: Callable[[list[float], float], bool],
                 error: Callable[[], float], epochs: Callable[[int], int], lr_scale: float, most: int) -> None:
        self.phases, self.still_learning, self.error = phases, still_learning, error
        self.epochs, self.lr_scale, self.most = epochs, lr_scale, most

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        extensions = trainer.state.setdefault("extensions", [])
        if trainer.epoch < trainer.epochs or trainer.stop or len(extensions) >= self.most:
            return
        start = self.phases.phase_of(trainer)[3]
        losses = [h["val_loss"] for h in trainer.state["history"][start - 1:]]
        # Every rank takes rank 0's decision (its val scores are the ones recorded).
        if not distributed.broadcast_object(self.still_learning(losses, self.error())):
            return
        more = self.epochs(self.phases.epochs)
        extensions.append({"start": trainer.epoch + 1, "epochs": more, "lr_scale": self.lr_scale})
        trainer.epochs += more
        log(f"still learning at epoch {trainer.epoch} (the val loss fell by more than its noise over the last "
            f"quarter of the schedule, to {row['val_loss']:.4f}): {more} more epochs from the final weights, at "
            f"{self.lr_scale:g} × the peak learning rate")


class DDP(Callback):
    """Under torchrun: PyTorch's DistributedDataParallel averages the gradients across processes. It is
    rebuilt with every optimizer (a new phase) because it only syncs the parameters that train; the
    plain module is what is evaluated and saved. Goes after FreezePhase."""

    def __init__(self) -> None:
        self.optimizer = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        if trainer.optimizer is not self.optimizer:
            self.optimizer = trainer.optimizer
            trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.net)


class SeedEpochs(Callback):
    """Shuffling (or balanced drawing) seeded per epoch, so a resumed run draws exactly as an
    uninterrupted one would; under torchrun every rank draws the same epoch and keeps its share."""

    def __init__(self, loader, sampler, seed: int) -> None:
        self.loader, self.sampler, self.seed = loader, sampler, seed

    def on_epoch_start(self, trainer: Trainer) -> None:
        if isinstance(self.sampler, torch.utils.data.DistributedSampler):
            self.sampler.set_epoch(trainer.epoch)
        else:
            generator = self.sampler.generator if self.sampler else self.loader.generator
            generator.manual_seed(self.seed * 100_003 + trainer.epoch)


class Progress(Callback):
    """A bar per epoch: images, rate and running loss, then the epoch's validation scores (* where
    its weights are kept)."""

    def __init__(self) -> None:
        self.bar = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.bar = progress_bar()
        self.bar.start()
        self.task = self.bar.add_task(f"epoch {trainer.epoch}/{trainer.epochs}" + (" (head only)" if trainer.frozen
                                                                                  else ""),
                                      total=trainer.images_per_epoch, info="")

    def on_step_end(self, trainer: Trainer) -> None:
        self.bar.update(self.task, completed=trainer.seen, info=f"loss {trainer.train_loss:.4f}")

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        kept = trainer.state["best_epoch"] == trainer.epoch
        self.bar.update(self.task, info=f"loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
                                        f"acc {row['val_accuracy']:.4f} F1 {row['val_macro_f1']:.4f}" + (" *" if kept else ""))
        self.close(trainer)

    def close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class KeepBest(Callback):
    """Saves the epoch's weights as the run's checkpoint when `choose` keeps them. --monitor none keeps
    every epoch, so the final weights of the schedule; loss or macro_f1 add the score's standard error
    (`error()`) to the history, for the one-standard-error rule."""

    def __init__(self, monitor: str, error: Callable[[], float], path: Path, meta: dict[str, Any]) -> None:
        self.monitor, self.error, self.path, self.meta = monitor, error, path, meta

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.monitor != "none":
            row[f"val_{self.monitor}_se"] = self.error()
        row.update(distributed.broadcast_object(row))  # every rank takes rank 0's decisions
        if self.monitor == "none":  # the whole schedule runs; its final weights are kept
            kept = choose(trainer.state, trainer.epoch, float(trainer.epoch), 0.0)
        else:
            score = -row["val_loss"] if self.monitor == "loss" else row["val_macro_f1"]
            kept = choose(trainer.state, trainer.epoch, score, row[f"val_{self.monitor}_se"])
        if kept and distributed.is_main():
            save_checkpoint(self.path, trainer.evaluated, self.meta, epoch=trainer.epoch)


def choose(state: dict[str, Any], epoch: int, score: float, error: float) -> bool:
    """Keep this epoch's weights? Yes if its score beats the best so far, or lies within one standard
    error of it (the one-standard-error rule): on a few hundred validation images, scores swing by
    several points from epoch to epoch, and a later epoch that is as good within that noise has seen
    more training and the annealed learning rate. Higher scores are better."""
    best = state["best"]
    if best is None or score > best:
        state["best"], state["best_se"] = score, error
    elif score < best - state["best_se"]:
        return False
    state["best_epoch"] = epoch
    return True


class EarlyStopping(Callback):
    """Stops once `patience` epochs of the unfrozen phase bring nothing within noise of the best."""

    def __init__(self, monitor: str, patience: int, freeze_epochs: int) -> None:
        self.monitor, self.patience, self.freeze_epochs = monitor, patience, freeze_epochs

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.epoch > self.freeze_epochs and \
                trainer.epoch - max(trainer.state["best_epoch"], self.freeze_epochs) >= self.patience:
            log(f"early stop: no validation {self.monitor} within noise of the best for {self.patience} epochs")
            trainer.stop = True


class History(Callback):
    """history.csv, one row per epoch, rewritten after each; the training curves at the end."""

    def __init__(self, run: RunPaths) -> None:
        self.path, self.curves = run.history, run.curves

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        trainer.state["history"].append(row)
        if distributed.is_main():
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(trainer.state["history"][0]))
            w.writeheader()
            w.writerows(trainer.state["history"])
            write_text(self.path, buf.getvalue())

    def on_fit_end(self, trainer: Trainer) -> None:
        from featurepipe.plots import training_curves

        if distributed.is_main():
            training_curves(trainer.state["history"], self.curves)


class ResumeState(Callback):
    """last.pt after every epoch: weights, moving average, optimizer, schedule, scaler, the trainer's
    state and every random generator, so that --resume continues as if never interrupted. With
    `resume`, the fit starts from it."""

    def __init__(self, run: RunPaths, meta: dict[str, Any], resume: bool, phases: FreezePhase,
                 ema: EMA | None) -> None:
        self.run, self.path, self.meta = run, run.last_checkpoint, meta
        self.resume, self.phases, self.ema = resume, phases, ema

    def on_fit_start(self, trainer: Trainer) -> None:
        if not (self.resume and self.path.exists()):
            return
        ckpt = _load_resume_state(self.path)
        trainer.net.load_state_dict(ckpt["train_state_dict"])
        if self.ema is not None:
            self.ema.averaged.load_state_dict(ckpt["ema"])
        trainer.state = ckpt["state"]
        trainer.epoch = trainer.state["epoch"]
        trainer.epochs += sum(e["epochs"] for e in trainer.state.get("extensions", []))
        self.phases.on_epoch_start(trainer)  # the optimizer of the phase it stopped in
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
        trainer.scaler.load_state_dict(ckpt["scaler"])
        _set_rng(ckpt["rng"])
        log(f"resuming {self.run.root} after epoch {trainer.epoch}")

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if distributed.is_main():
            save_checkpoint(self.path, trainer.evaluated, self.meta, train_state_dict=trainer.net.state_dict(),
                            ema=self.ema.averaged.state_dict() if self.ema is not None else None,
                            optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
                            scaler=trainer.scaler.state_dict(), state=trainer.state, rng=_get_rng())


def _load_resume_state(path: Path) -> dict[str, Any]:
    """last.pt with weights_only=True: tensors and plain containers only, so a planted file runs no code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeaturepipeError(f"{path}: cannot be loaded safely as a featurepipe resume state ({first_line(e)}); "
                               "start over with --overwrite") from None


def _get_rng() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers, so last.pt loads with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, python_gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                     "gauss": float(gauss)},
           "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": python_gauss}}
    if torch.cuda.is_available():  # augmentation draws on the training device
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n, p = rng["numpy"], rng["python"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
