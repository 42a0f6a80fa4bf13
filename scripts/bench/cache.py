"""The disk cache (data/cache.py) on an archive forced above the memory cap, in one run:

    python -m scripts.bench cache --data /work/data16/mri20k [--size 128] [--rounds 3] [--work DIR]

  decode     the one decode pass that fills the cache (images/s), and its size on disk;
  train-cnn  a real train-cnn (sixblock) on the cached archive: JPEG decodes counted in this process
             after the fill (the loaders read the cache in-process, so none can hide in a worker);
  extract    `extract` after training: its JPEG decodes, counted the same way (0 is the claim);
  epoch      a training pass (train-cnn's loader, augmentation and step) over the train split read
             from the disk cache and from the same pixels in memory, alternating, best of --rounds
             each: load and the VM's swings touch both sides alike;
  memory     peak anonymous and file-backed resident memory of a pass over N and 8N cached images
             (fresh processes): the map's pages are page cache, not the process's own memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe.data import sources
from featurepipe.models import create_model
from scripts.common import fresh_python, train_step


class DecodeCounter:
    """Counts decodes of image files in this process (FileStore.read's decoder)."""

    def __init__(self) -> None:
        self.n, self.real = 0, sources.read_file

    def __enter__(self):
        def counted(*args, **kwargs):
            self.n += 1
            return self.real(*args, **kwargs)

        sources.read_file = counted
        return self

    def __exit__(self, *exc) -> None:
        sources.read_file = self.real


def training_pass(ds: fdata.ImageDataset, net, augment, opt, batch: int, seed: int) -> float:
    """Images/s of one epoch as train-cnn's fit runs it (loader, augmentation, forward, backward, step)."""
    loader = fdata.make_loader(ds, batch, shuffle=True, seed=seed, drop_last=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    n, t0 = 0, time.perf_counter()
    for x, y, _, _ in loader:
        x = augment(x.contiguous(memory_format=torch.channels_last)) if augment else x
        train_step(net, loss_fn, opt, x, y)
        n += len(y)
    return n / (time.perf_counter() - t0)


PASS = """
import numpy as np
from featurepipe import data as fdata
from featurepipe.data import cache
catalog = fdata.scan({data!r})
disk = cache.reuse(catalog.store, {size}, 1)
rows = np.arange({n})
ds = fdata.ImageDataset(disk, rows, catalog.labels[rows], {size}, 1)
def status(key):
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))
anon = 0
for x, *_ in fdata.make_loader(ds, 256, once=True):
    x.float().mean()
    anon = max(anon, status('RssAnon'))
print(anon, status('VmHWM'), status('RssFile'))
"""


def pass_memory(data: Path, size: int, n: int) -> tuple[int, int, int]:
    """KiB: peak RssAnon, VmHWM, RssFile at the end, of one pass over n cached rows in a fresh process."""
    return tuple(int(v) for v in fresh_python(PASS.format(data=str(data), size=size, n=n), env=os.environ).split())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/data16/mri20k"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="of the real train-cnn")
    parser.add_argument("--pass-images", type=int, default=6000, help="train images per measured pass (2 cores)")
    parser.add_argument("--work", type=Path, default=Path("/work/data16/bench"))
    parser.add_argument("--epoch-only", action="store_true", help="the epoch and memory figures only")
    args = parser.parse_args(argv)
    if not args.epoch_only:
        shutil.rmtree(args.work, ignore_errors=True)
    os.environ["FEATUREPIPE_CACHE_DIR"] = str(args.work / "cache")
    os.environ["FEATUREPIPE_CACHE_BYTES"] = "1"  # every split above the cap
    torch.manual_seed(0)

    catalog = fdata.scan(str(args.data))
    splits = fdata.assign_splits(catalog, 0)
    t0 = time.perf_counter()
    stores, splits, skipped = fdata.load_splits(catalog, splits, args.size, 1)
    fill = time.perf_counter() - t0
    disk = stores["train"][0]
    st = disk.data.stat()
    print(f"decode: {len(catalog)} JPEGs in {fill:.1f} s ({len(catalog) / fill:.0f} img/s) -> {disk.folder}: "
          f"{st.st_size / 2**20:.0f} MiB ({st.st_blocks * 512 / 2**20:.0f} MiB allocated), {len(skipped)} unreadable",
          flush=True)

    if not args.epoch_only:
        train_and_extract(args)
    epoch_and_memory(args, catalog, stores, disk)


def train_and_extract(args) -> None:
    from featurepipe.extract import extract
    from featurepipe.options import TrainConfig
    from featurepipe.train import train

    run = args.work / "run"
    cfg = TrainConfig(arch="sixblock", img_size=args.size, epochs=args.epochs, batch_size=128, overwrite=True,
                      device="cpu")
    with DecodeCounter() as decodes:
        t0 = time.perf_counter()
        train(str(args.data), run, cfg)
        print(f"train-cnn ({args.epochs} epochs) {time.perf_counter() - t0:.0f} s, JPEG decodes after the fill: "
              f"{decodes.n}", flush=True)
    with open(run / "cnn" / "history.csv") as f:
        print("train-cnn history:\n" + f.read().strip(), flush=True)
    with DecodeCounter() as decodes:
        t0 = time.perf_counter()
        extract(str(run), batch_size=256, device="cpu")
        print(f"extract: {time.perf_counter() - t0:.1f} s, JPEG decodes: {decodes.n}", flush=True)


def epoch_and_memory(args, catalog, stores, disk) -> None:
    """Training passes, disk cache against memory, alternating; then memory of N and 8N cached rows."""
    # A random share of the train split: rows all over the map, as an epoch reads them.
    positions = np.sort(np.random.default_rng(0).permutation(stores["train"][1])[:args.pass_images])
    memory = fdata.ArrayStore(np.array(disk.images[positions]), "in memory")
    labels = catalog.labels[positions]
    sets = {"memory": fdata.ImageDataset(memory, np.arange(len(positions)), labels, args.size, 1),
            "disk": fdata.ImageDataset(disk, positions, labels, args.size, 1)}
    net = create_model("sixblock", len(catalog.class_names), 1, [0.5], [0.25]).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    augment = fdata.augmentation("xray")
    rates: dict[str, list[float]] = {"memory": [], "disk": []}
    for r in range(args.rounds):
        for name in ("memory", "disk") if r % 2 == 0 else ("disk", "memory"):  # neither always goes first
            rates[name].append(training_pass(sets[name], net, augment, opt, 128, seed=r))
        print(f"epoch round {r}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()), flush=True)
    best = {k: max(v) for k, v in rates.items()}
    print(f"epoch: disk cache {best['disk']:.0f} / in memory {best['memory']:.0f} img/s = "
          f"{best['disk'] / best['memory']:.3f} (best of {args.rounds}, alternating)", flush=True)

    n = len(catalog) // 8
    small, big = pass_memory(args.data, args.size, n), pass_memory(args.data, args.size, 8 * n)
    print(f"memory of a pass over {n} -> {8 * n} cached images (MiB): peak anonymous {small[0] / 1024:.0f} -> "
          f"{big[0] / 1024:.0f} ({big[0] / small[0]:.2f}), peak RSS {small[1] / 1024:.0f} -> {big[1] / 1024:.0f}, "
          f"file-backed {small[2] / 1024:.0f} -> {big[2] / 1024:.0f}")


if __name__ == "__main__":
    main()
