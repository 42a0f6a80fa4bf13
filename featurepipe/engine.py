"""The training loop, read top to bottom: fit → epoch → step.

What differs between runs (the moving average, the frozen phase, which epoch is kept, early stopping,
the history, resuming, torchrun, the progress bar) is a `Callback` (featurepipe/callbacks.py); the
loop itself does the same thing every time.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from featurepipe.device import autocast, needs_grad_scaler, release_freed_memory, to_device
from featurepipe.errors import FeaturepipeError


class Callback:
    """Hooks of `Trainer.fit`, each called on every callback in the order they were given. A callback
    reads and changes the trainer: its optimizer, the module it runs (`model`) or validates
    (`evaluated`), `state` (what a resumed fit continues from), `stop`."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_epoch_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer) -> None:
        """After the optimizer step and the scheduler's, the batch's loss counted in `train_loss`."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After validation; `row` is the epoch's line of the history (its metrics)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The schedule ran out or a callback stopped it (not on an error)."""

    def close(self, trainer: Trainer) -> None:
        """However fit ends, an error or Ctrl-C included: let go of what the callback holds."""


class Trainer:
    """Trains `net` on `loader` for `epochs` epochs, validating after each with `validate`.

    `validate(module)` returns the epoch's validation metrics (history columns, in order). Before the
    first epoch some callback must set `optimizer` (and `scheduler`, or leave it None).
    """

    def __init__(self, net: nn.Module, loader, criterion: nn.Module, device: torch.device, amp: bool | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 validate: Callable[[nn.Module], dict[str, float]] | None = None,
                 callbacks: Iterable[Callback] = (), epochs: int = 0) -> None:
        self.net = net  # the plain module: what is saved
        self.model = net  # what the step runs: `net`, or a wrapper around it (DDP)
        self.evaluated = net  # what is validated and kept: `net`, or its moving average
        self.loader, self.criterion, self.device, self.amp, self.augment = loader, criterion, device, amp, augment
        self.validate, self.callbacks, self.epochs = validate, list(callbacks), epochs
        # fp16 gradients underflow without scaling; bf16 and fp32 need none (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, amp))
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.frozen = False  # the backbone does not train: its batch-norm statistics stay as they are
        self.epoch = 0
        self.stop = False
        # What a resumed fit continues from (saved in last.pt): epochs done, the choice so far, the history.
        self.state: dict[str, Any] = {"epoch": 0, "best": None, "best_se": 0.0, "best_epoch": 0, "history": []}
        self.seen, self.train_loss = 0, 0.0  # images and mean loss so far in this epoch

    def fit(self) -> None:
        try:
            self._call("on_fit_start")
            started = time.perf_counter() - self.state.get("seconds", 0.0)
            # `epochs` is read anew every epoch: a callback may lengthen the schedule (callbacks.Extend).
            while self.state["epoch"] < self.epochs:
                self.epoch = self.state["epoch"] + 1
                self._call("on_epoch_start")
                t0 = time.perf_counter()
                train_loss, train_accuracy = self.train_epoch()
                train_seconds = time.perf_counter() - t0
                row = {"epoch": self.epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                       **self.validate(self.evaluated), "lr": self.optimizer.param_groups[-1]["lr"],
                       "seconds": round(time.perf_counter() - t0, 2),
                       "train_images_per_second": round(self.images_per_epoch / train_seconds, 1)}
                self.state["epoch"], self.state["seconds"] = self.epoch, time.perf_counter() - started
                self._call("on_epoch_end", row)
                release_freed_memory()  # once an epoch: the kept heap (keep_freed_memory) cannot drift far
                if self.stop:
                    break
            self._call("on_fit_end")
        finally:
            self._call("close")

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the loader; the mean training loss and accuracy."""
        self.model.train()
        if self.frozen:
            self.net.features.eval()
        total_loss, correct, self.seen = 0.0, 0, 0
        for x, y, k, why in self.loader:
            self.loader.dataset.check(k, why)  # only a file changed since prepare() checked it can fail here
            x, y = to_device(x, self.device), y.to(self.device, non_blocking=True)
            loss, logits = self.step(x, y)
            value = loss.item()
            if not math.isfinite(value) and not self.scaler.is_enabled():  # fp16's scaler skips such steps itself
                raise diverged("the training loss", value, max(g["lr"] for g in self.optimizer.param_groups))
            total_loss += value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            self.seen += len(y)
            self.train_loss = total_loss / self.seen
            self._call("on_step_end")
        return total_loss / self.seen, correct / self.seen

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch already on the device; its loss and logits. lr-find takes the
        same step (featurepipe/lr_find.py)."""
        if self.augment is not None:  # on the model's own [0, 1] scale (its intensity window applied first)
            x = self.augment(self.net.scale(x)).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss, logits

    @property
    def images_per_epoch(self) -> int:
        loader = self.loader
        return len(loader) * loader.batch_size if loader.drop_last else len(loader.dataset)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def diverged(what: str, value: float, lr: float) -> FeaturepipeError:
    return FeaturepipeError(f"training diverged: {what} became {value} (peak learning rate {lr:g}); "
                            "lower --lr, or check the images for extreme values")
