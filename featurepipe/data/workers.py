"""Reading many images in worker processes: how many workers, and one pass over a store that hands
failures back as data. The decode cache (cache.py), train-cnn's decoding (load.py) and `data inspect`
all go through `each_image`."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featurepipe.data.images import UnreadableImage
from featurepipe.data.sources import ArrayStore, FileStore
from featurepipe.distributed import cores, launch
from featurepipe.progress import progress_bar


def num_workers(store: ArrayStore | FileStore) -> int:
    """Decoding files needs worker processes; arrays in memory are faster without the IPC.

    One core is left to the main process (the model), and under torchrun the processes on one
    machine share its cores.
    """
    if store.in_memory:
        return 0
    share = cores() // launch().local_world_size
    return max(1, min(16, share - 1))


def each_image(store: ArrayStore | FileStore, indices: np.ndarray, fn: Callable[[Any, int], Any],
               description: str) -> Iterator[tuple[int, Any, str]]:
    """(k, fn(store, indices[k]), "") or (k, None, why it is unreadable) for every k, in order.

    Files are read in worker processes (fn must be picklable: a module-level function or a partial).
    Failures travel as data: an exception raised in a loader worker reaches the main process as a
    multi-line traceback instead of the one line a user should see.
    """
    # A generator of its own: a DataLoader draws its workers' base seed from torch's global one otherwise,
    # and whether a pass runs at all depends on what the disk cache holds, so a seed would not mean one model.
    loader = DataLoader(_Each(store, indices, fn), batch_size=64, num_workers=num_workers(store), collate_fn=list,
                        generator=torch.Generator())
    failed = 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(indices), info="")
        for batch in loader:
            yield from batch
            failed += sum(1 for _, _, why in batch if why)
            bar.update(task, advance=len(batch), info=f"{failed} unreadable" if failed else "")


class _Each(Dataset):
    def __init__(self, store: ArrayStore | FileStore, indices: np.ndarray, fn) -> None:
        self.store, self.indices, self.fn = store, indices, fn

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        try:
            return k, self.fn(self.store, int(self.indices[k])), ""
        except UnreadableImage as e:
            return k, None, e.reason or str(e)
