"""Peak memory of `extract` under torchrun on N and 8N images: rank 0 writes each step's rows (one batch
from every rank) as they arrive, so no rank's memory may grow with the number of images.

    python -m scripts.bench torchrun_memory [--n 2000] [--nproc 2] [--work DIR]

Trains a small sixblock run (train-cnn, one epoch, 28 px) on a synthetic .npz, then runs `extract --data
X.npz --out X.h5` under `torchrun --standalone --nproc-per-node NPROC` (Gloo, one thread a process) on
N and on 8N synthetic images, and prints every rank's peak resident memory (VmHWM, read at exit) beside
the size of the features at 8N: what rank 0 would add if it held every rank's rows until the end. Every
rank holds the images themselves in memory (an .npz is read whole), so every rank grows with them; rank
1 writes nothing, and what rank 0 grows beyond rank 1 is the writer's own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from scripts.common import ROOT, featurepipe

# Run by torchrun in each rank: featurepipe's CLI, then the process's peak resident memory into a file.
RANK_PEAK = """
import atexit, os, sys
record = sys.argv.pop(1)

def peak():
    kib = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
    open(f"{record}.rank{os.environ.get('RANK', '0')}", "w").write(kib)

atexit.register(peak)
sys.argv[0] = "featurepipe"
from featurepipe.cli import main
main()
"""


def synthetic_npz(path: Path, n: int, seed: int) -> Path:
    """n grey 28-px images in three classes, split 70/15/15 as an .npz of MedMNIST's layout."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        m = max(3, int(n * share))
        labels = np.arange(m) % 3
        images = rng.integers(0, 60, (m, 28, 28), dtype=np.uint8)
        for c in range(3):  # a visible class: a brighter band in another place
            images[labels == c, 9 * c:9 * c + 9, :] += 120
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return path


def peaks_under_torchrun(nproc: int, run: Path, data: Path, out: Path) -> list[float]:
    """Each rank's peak resident memory (MiB) of one extract under torchrun."""
    script = out.with_suffix(".rank.py")
    script.write_text(RANK_PEAK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", str(script), str(out), "extract", "--run-dir", str(run),
                             "--data", str(data), "--out", str(out), "--device", "cpu", "--overwrite"],
                            env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"extract under torchrun failed:\n{result.stderr[-3000:]}")
    return [int(Path(f"{out}.rank{r}").read_text()) / 1024 for r in range(nproc)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="N: images of the smaller extract (the larger: 8N)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run and files (default: a temp one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="torchrun-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    if not (run / "cnn" / "metrics.json").exists():
        trained = featurepipe("train-cnn", "--data", synthetic_npz(work / "train.npz", 600, 0), "--out", run,
                              "--arch", "sixblock", "--img-size", 28, "--epochs", 1, "--overwrite",
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if trained.returncode:
            sys.exit(trained.stderr[-3000:])
    rows = []
    for n in (args.n, 8 * args.n):
        data = synthetic_npz(work / f"images-{n}.npz", n, 1)
        out = work / f"features-{n}.h5"
        peaks = peaks_under_torchrun(args.nproc, run, data, out)
        import h5py

        with h5py.File(out) as h5:
            images = sum(len(h5[s]["ids"]) for s in ("train", "val", "test"))
            features_mib = sum(h5[s]["features"].size * 4 for s in ("train", "val", "test")) / 2**20
        rows.append((images, peaks, features_mib))
    print(f"extract under torchrun, {args.nproc} processes (Gloo, CPU, one thread each), sixblock at 28 px")
    print(f"{'images':>8}  " + "  ".join(f"{f'rank {r} peak MiB':>16}" for r in range(args.nproc))
          + f"  {'features MiB':>12}")
    for images, peaks, features_mib in rows:
        print(f"{images:>8}  " + "  ".join(f"{p:>16.1f}" for p in peaks) + f"  {features_mib:>12.1f}")
    (n_images, n_peaks, _), (big_images, big_peaks, big_features) = rows
    grew = [big - small for big, small in zip(big_peaks, n_peaks)]
    print(f"from {n_images} to {big_images} images: rank 0 grew {grew[0]:+.1f} MiB"
          + (f", rank 1 (which writes nothing) {grew[1]:+.1f} MiB: rank 0's own part {grew[0] - grew[1]:+.1f} MiB"
             if len(grew) > 1 else "")
          + f"; holding every rank's rows would add {big_features:.1f} MiB of features to rank 0")


if __name__ == "__main__":
    main()
