"""Multi-process runs under torchrun: PyTorch's own DistributedDataParallel, NCCL on GPUs, Gloo on CPUs.

`torchrun --nproc_per_node=N featurepipe train-cnn …` sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE;
`launch()` reads them, once, for the whole process. Everything else is a one-process run (world size 1)
and these helpers are no-ops.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from featurepipe.errors import FeaturepipeError


@dataclass(frozen=True)
class Launch:
    """How this process was started: torchrun's environment, or rank 0 of 1 for a plain start."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "Launch":
        return cls(*(int(environ.get(name, default)) for name, default in
                     (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that speaks, locks the run and writes it."""
        return self.rank == 0


@functools.cache
def launch() -> Launch:
    """This process's Launch: the environment is read here alone, the first time anything asks."""
    return Launch.from_environ()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; returns this process's device."""
    started = launch()
    if started.world_size <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        per_node, gpus = started.local_world_size, torch.cuda.device_count()
        if per_node > gpus:
            raise FeaturepipeError(f"torchrun started {per_node} processes per node but this machine has {gpus} GPU(s); "
                                   f"use --nproc_per_node={gpus}, or --device cpu")
        device = torch.device("cuda", started.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Leave the group while the interpreter is still whole: Gloo's threads outliving it abort the
    # process at exit (SIGABRT, "terminate called without an active exception") now and then.
    atexit.register(teardown)
    if device.type == "cpu":
        # N processes on one machine share its cores; without this each spins up all of them.
        torch.set_num_threads(max(1, cores() // started.local_world_size))
    return device


def cores() -> int:
    """The cores this process may run on: its affinity (taskset's, a crossval fold worker's share), not
    the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of obj on every rank (a decision made once, e.g. early stopping)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def local_rank() -> int:
    return launch().local_rank if world_size() > 1 else 0


def local_world_size() -> int:
    return launch().local_world_size if world_size() > 1 else 1


def node_shared_array(shape: tuple[int, ...]) -> np.ndarray | None:
    """A zeroed uint8 array that every process on this machine maps: one copy per machine, which each
    can fill a share of and all then read. None where neither /dev/shm nor the temp folder has room
    (each process then keeps its own copy).

    A file, created by the machine's first process and removed as soon as all have mapped it, so
    nothing is left behind; the memory goes when the last process lets go of it.
    """
    nbytes = int(np.prod(shape))
    if local_world_size() == 1 or nbytes == 0:  # no one to share with (or nothing to map)
        return np.zeros(shape, np.uint8)
    token = broadcast_object(secrets.token_hex(8))
    paths = [Path(folder) / f"featurepipe-{token}.u8" for folder in ("/dev/shm", tempfile.gettempdir())]
    if local_rank() == 0:
        for path in paths:
            # Room to spare: a full tmpfs kills whoever touches an unbacked page (SIGBUS).
            folder = path.parent
            if folder.is_dir() and os.access(folder, os.W_OK) and shutil.disk_usage(folder).free > 1.25 * nbytes:
                np.memmap(path, np.uint8, "w+", shape=shape).flush()
                break
    barrier()
    path = next((p for p in paths if p.exists()), None)
    array = np.memmap(path, np.uint8, "r+", shape=shape) if path is not None else None
    barrier()
    if path is not None and local_rank() == 0:
        path.unlink()
    return array
