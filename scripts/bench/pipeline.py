"""Throughput and memory of featurepipe's own data path against the model's compute limit.

    python -m scripts.bench pipeline [--data ../shared/data/pneumoniamnist.npz] [--images 2000] [--quick]
                                     [--device auto|cpu|cuda]

For sixblock at 28 px (PneumoniaMNIST) and resnet18 at 224 px (a folder of 512x512 JPEGs made
from the same arrays, upscaled), it prints one table:
  extract   images/s of `extract` (decode, batch, forward, HDF5 write) vs the model's pure forward
            pass on uint8 tensors already in memory, same batch size, passes (device.images_per_pass)
            and threads (on a GPU: the same autocast), each in a fresh process as a user's command runs;
  train     images/s of a train-cnn epoch's training pass (loader, augmentation, step) vs pure
            forward+backward+step on in-memory tensors;
  memory    peak resident memory of `extract --data` on N and 8N images (separate processes);
  hdf5      write and full-read throughput of a features file (MB/s), per --compression;
  --cache   the disk cache's (scripts/bench/cache.py): epoch from the cache / from memory, decodes after
            training, memory of N and 8N cached images.
On a GPU, extract and training take data/gpu.py's paths: arrays sliced on the device, JPEGs by nvJPEG.

Shared and virtual machines vary by tens of percent from minute to minute, so each rate is the
best of several rounds, taken alternately (--rounds): the least disturbed round of each, measured
side by side.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

from featurepipe.device import resolve_device
from featurepipe.features import CHUNK_BYTES, COMPRESSION, hdf5_filters, read_split
from featurepipe.models import load_checkpoint
from featurepipe.options import TrainConfig
from featurepipe.train import train
from scripts.common import DATA, fresh_python, pure_step


def jpeg_folder(npz: Path, out: Path, n: int, size: int) -> Path:
    """n PneumoniaMNIST train images (cycled past its 4708) upscaled to size x size JPEGs in class folders."""
    from PIL import Image

    data = np.load(npz)
    x, y = data["train_images"], data["train_labels"][:, 0]

    def save(i: int) -> None:
        path = out / str(y[i % len(x)]) / f"{i:05d}.jpg"
        Image.fromarray(x[i % len(x)]).resize((size, size), Image.BICUBIC).save(path, quality=90)

    for label in np.unique(y):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL lets go of the GIL to resize and encode
        list(pool.map(save, range(n)))
    return out


def extract_rate(run: Path, batch: int, device: torch.device) -> float:
    # The CUDA context is made before the clock starts, as the interpreter and imports are.
    warm = "torch.zeros(1, device='cuda')\n" if device.type == "cuda" else ""
    return float(fresh_python(
        f"import time, torch\nfrom featurepipe.extract import extract\nfrom featurepipe.features import read_split\n{warm}"
        f"t0 = time.perf_counter(); extract({str(run)!r}, batch_size={batch}, device={device.type!r})\n"
        "t = time.perf_counter() - t0\n"
        f"print(sum(len(read_split({str(run / 'features.h5')!r}, s).labels) for s in ('train', 'val', 'test')) / t)"))


def forward_rate(run: Path, shape: tuple[int, ...], batch: int, device: torch.device) -> float:
    return float(fresh_python(
        "import torch\nfrom scripts.common import pure_forward\nfrom featurepipe.models import load_checkpoint\n"
        f"net, _ = load_checkpoint({str(run / 'cnn' / 'model.pt')!r}, {device.type!r})\n"
        f"print(pure_forward(net.to(memory_format=torch.channels_last), {shape!r}, {batch}))"))


def peak_rss_of_extract(run: Path, data: Path, out: Path, batch: int, device: torch.device) -> float:
    """MiB. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started
    from this (large) process would report this process's peak instead of its own."""
    return int(fresh_python(
        "from featurepipe.extract import extract\n"
        f"extract({str(run)!r}, batch_size={batch}, data={str(data)!r}, out={str(out)!r}, device={device.type!r})\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")) / 1024


def hdf5_throughput(path: Path, features: np.ndarray, compression: str, rows: int = 200_000,
                    batch: int = 256) -> tuple[float, float, float]:
    """Write and full-read MB/s of `rows` feature rows (cycling over `features`) in extract's chunks and
    with its filters, and the file's size over the raw bytes."""
    dim = features.shape[1]
    mb = rows * dim * 4 / 2**20
    t0 = time.perf_counter()
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features", shape=(rows, dim), dtype="float32",
                               chunks=(max(1, CHUNK_BYTES // (4 * dim)), dim), **hdf5_filters(compression))
        for start in range(0, rows, batch):
            ds[start:start + batch] = np.take(features, range(start, min(start + batch, rows)), axis=0, mode="wrap")
    write = mb / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with h5py.File(path, "r") as h5:
        h5["features"][:]
    read = mb / (time.perf_counter() - t0)
    return write, read, path.stat().st_size / 2**20 / mb


def bench(name: str, data: Path, arch: str, img_size: int, batch: int, work: Path, mem_data: tuple[Path, Path],
          rounds: int, device: torch.device):
    run = work / f"run-{name}"
    cfg = TrainConfig(arch=arch, img_size=img_size, epochs=rounds, batch_size=64, overwrite=True, device=device.type)
    train(str(data), run, cfg)
    with open(run / "cnn" / "history.csv", newline="") as f:
        train_rate = max(float(row["train_images_per_second"]) for row in csv.DictReader(f))  # best epoch
    net, meta = load_checkpoint(run / "cnn" / "model.pt", device)
    shape = (meta["in_channels"], img_size, img_size)
    net = net.to(memory_format=torch.channels_last)
    # Extraction and its limit each in a fresh process, as the command runs; the training step here,
    # in the state training left this process in.
    rates = [(extract_rate(run, batch, device), forward_rate(run, shape, batch, device),
              pure_step(net, shape, 64, meta["num_classes"])) for _ in range(rounds)]
    extract_img_s, forward_img_s, step_rate = (max(r[i] for r in rates) for i in range(3))
    print(f"{name}: extract/forward/step images/s per round {rates}", flush=True)

    small, big = mem_data
    mem_n = peak_rss_of_extract(run, small, work / f"{name}-n.h5", batch, device)
    mem_8n = peak_rss_of_extract(run, big, work / f"{name}-8n.h5", batch, device)
    return {
        "config": name, "extract_img_s": extract_img_s, "forward_img_s": forward_img_s,
        "extract_ratio": extract_img_s / forward_img_s, "train_img_s": train_rate, "step_img_s": step_rate,
        "train_ratio": train_rate / step_rate, "mem_n_mib": mem_n, "mem_8n_mib": mem_8n, "mem_ratio": mem_8n / mem_n,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "pneumoniamnist.npz")
    parser.add_argument("--images", type=int, default=2000, help="JPEGs for the resnet18 folder")
    parser.add_argument("--mem-n", type=int, default=250, help="N for the memory measurement (and 8N)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per rate (training: epochs); the best is kept")
    parser.add_argument("--quick", action="store_true", help="sixblock only")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (as the commands' --device)")
    parser.add_argument("--cache", action="store_true",
                        help="also the disk cache's figures (scripts/bench/cache.py) on the resnet18 JPEG folder")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores{gpu}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="featurepipe-bench-") as tmp:
        work = Path(tmp)
        small28 = jpeg_folder(args.data, work / "mem28-n", args.mem_n, 28)
        big28 = jpeg_folder(args.data, work / "mem28-8n", 8 * args.mem_n, 28)
        rows.append(bench("sixblock@28", args.data, "sixblock", 28, 256, work, (small28, big28), args.rounds, device))
        if not args.quick:
            folder = jpeg_folder(args.data, work / "jpeg512", args.images, 512)
            small = jpeg_folder(args.data, work / "mem512-n", args.mem_n, 512)
            big = jpeg_folder(args.data, work / "mem512-8n", 8 * args.mem_n, 512)
            rows.append(bench("resnet18@224", folder, "resnet18", 224, 64, work, (small, big), args.rounds, device))
            if args.cache:
                # In its own process: it points the cache at its own folder through the environment.
                subprocess.run([sys.executable, "-m", "scripts.bench", "cache", "--data", str(folder),
                                "--work", str(work / "cache-bench"), "--rounds", str(args.rounds)], check=True)
        # The 512-d features of the last run when there is one (resnet18), else sixblock's 256-d.
        real = read_split(work / f"run-{rows[-1]['config']}" / "features.h5", "train").features
        h5rates = {c: hdf5_throughput(work / "h5bench.h5", real, c) for c in COMPRESSION}
    cols = ["config", "extract_img_s", "forward_img_s", "extract_ratio", "train_img_s", "step_img_s", "train_ratio",
            "mem_n_mib", "mem_8n_mib", "mem_ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.2f}" for c in cols) + " |")
    for c, (write, read, size) in h5rates.items():
        print(f"hdf5 features file, 200000 x {real.shape[1]} float32 ({rows[-1]['config']} features), compression "
              f"{c}: write {write:.0f} MB/s, full read {read:.0f} MB/s, size {size:.2f} of raw")


if __name__ == "__main__":
    main()
