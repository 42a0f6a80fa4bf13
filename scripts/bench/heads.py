"""Fit time of heads on synthetic embeddings, through the same code as `featurepipe fit-heads`.

    python -m scripts.bench heads                       # svm, 100 000 x 512 (Nystroem)
    python -m scripts.bench heads --n 20000 --heads svm,logreg,linsvm --tune val

The vectors are a few Gaussian clusters per class in D dimensions (non-negative, like pooled ReLU
features), so an RBF head has something to find. Prints one line per head: fit seconds (tuning and
calibration included), whether the kernel approximation was used, and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from featurepipe.heads import HeadsConfig, fit_heads, parse_heads
from featurepipe.models import fingerprint
from featurepipe.runs import run_paths


def write_run(root: Path, n: int, dim: int, classes: int, seed: int) -> None:
    """The files fit-heads reads: config, a checkpoint to fingerprint, a finished CNN, features.h5 (train n, val/test n/10)."""
    rng = np.random.default_rng(seed)
    names = [f"class{i}" for i in range(classes)]
    clusters = rng.gamma(1.0, 0.3, (classes, 4, dim)).astype(np.float32)
    paths = run_paths(root)
    paths.checkpoint.parent.mkdir(parents=True)
    paths.checkpoint.write_bytes(rng.bytes(64))
    paths.config.write_text(json.dumps({"data": {"class_names": names}, "train": {"seed": seed}}))
    paths.cnn_metrics.write_text("{}")  # a finished run, as fit-heads requires
    with h5py.File(paths.features, "w") as h5:
        h5.attrs.update({"class_names": json.dumps(names), "arch": "synthetic", "layer": "penultimate",
                         "tta": "none", "checkpoint": fingerprint(paths.checkpoint), "img_size": 0})
        for split, rows in (("train", n), ("val", max(100, n // 10)), ("test", max(100, n // 10))):
            g = h5.create_group(split)
            feats = g.create_dataset("features", (rows, dim), dtype="float32")
            y = rng.integers(0, classes, rows)
            for a in range(0, rows, 10_000):  # in slices: the generator's float64 would double the memory
                b = min(rows, a + 10_000)
                noise = rng.normal(0, 2.0, (b - a, dim)).astype(np.float32)
                feats[a:b] = np.maximum(0, clusters[y[a:b], rng.integers(0, 4, b - a)] + noise)
            g["labels"] = y.astype(np.int64)
            g.create_dataset("ids", data=np.array([f"{split}/{i}" for i in range(rows)], dtype=object),
                             dtype=h5py.string_dtype())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="training vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--heads", default="svm")
    ap.add_argument("--tune", default="none", help="none, val or cv (as fit-heads --tune)")
    ap.add_argument("--jobs", type=int, default=-1)
    ap.add_argument("--out-of-core", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_heads_") as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        write_run(run, args.n, args.dim, args.classes, args.seed)
        print(f"data: {args.n} x {args.dim} float32 ({args.n * args.dim * 4 / 2**20:.0f} MiB), "
              f"{args.classes} classes, written in {time.perf_counter() - t0:.1f} s", flush=True)
        config = HeadsConfig(tune=args.tune, jobs=args.jobs, out_of_core=args.out_of_core)
        for name in parse_heads(args.heads):
            fit_heads(run, [name], config)
            info = json.loads(run_paths(run).head_info(name).read_text())
            approx = info.get("approximation")
            how = f"nystroem({approx['n_components']})" if approx else "none"
            print(f"{name:8s} n_train={args.n} dim={args.dim} tune={args.tune} approximation={how:15s} "
                  f"out_of_core={info['out_of_core']} fit_seconds={info['fit_seconds']:.1f} "
                  f"test_accuracy={info['test']['accuracy']:.4f} params={info['params']}", flush=True)


if __name__ == "__main__":
    main()
