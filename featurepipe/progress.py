"""Progress bars with a rate and an ETA, on stderr so stdout stays clean for results."""

from __future__ import annotations

import functools
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


@functools.cache
def console() -> Console:
    """stderr's console, made on first use. Under torchrun only rank 0 speaks; the other ranks do the
    same work in silence."""
    from featurepipe.distributed import launch  # torch: not needed by commands that only log

    # In a log file (CI, nohup) there is no terminal width to fit; keep every column readable.
    return Console(stderr=True, width=None if sys.stderr.isatty() else 160, quiet=not launch().is_main)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            text = "?"
        elif speed >= 1:
            text = f"{speed:,.0f} {self.unit}/s"
        else:
            text = f"{1 / speed:,.1f} s/{self.unit}"
        return Text(text, style="progress.data.speed")


def progress_bar(unit: str = "img") -> Progress:
    """A bar for one stage; add tasks with `info=""` to show live figures such as the loss."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console(),
        transient=False,
    )


def log(message: str) -> None:
    console().print(message, highlight=False)


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"
