"""What the disk cache's checks cost (issue 22), for the code of two trees, alternating, in one run:

    python -m scripts.bench cache_checks --before DIR --after DIR --data FOLDER [--size 128] [--rounds 3]

  key    the cache's key: one stat per file (after: with its ctime and inode);
  fill   the one decode pass that writes the cache (workers decode, this process writes);
  open   opening the cache again in a fresh store (state, map, the 64-row sample);
  read   a first gather of every row, in batches of 128, as an epoch or extract reads them (after: each
         row's checksum checked on its first read in a process); the pages are warm for both trees.

Each measure runs in a fresh process per tree and round, in a fresh cache folder; the best of the
rounds is printed (the machine is shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from scripts.common import ROOT, fresh_python

ONE = """
import json, time
import numpy as np
from featurepipe import data as fdata
from featurepipe.data import cache
catalog = fdata.scan({data!r})
every = np.arange(len(catalog))
t0 = time.perf_counter(); cache.key(catalog.store, {size}, 1); key = time.perf_counter() - t0
disk = cache.for_archive(catalog.store, [len(catalog)], {size}, 1)
t0 = time.perf_counter(); disk.fill(every); fill = time.perf_counter() - t0
t0 = time.perf_counter(); again = cache.reuse(fdata.scan({data!r}).store, {size}, 1); opened = time.perf_counter() - t0
assert isinstance(again, cache.DiskCache)
ds = fdata.ImageDataset(again, every, catalog.labels, {size}, 1)
t0 = time.perf_counter()
for start in range(0, len(every), 128):
    x = ds.__getitems__(list(range(start, min(len(every), start + 128))))[0]
read = time.perf_counter() - t0
print(json.dumps({{"images": len(catalog), "key": key, "fill": fill, "open": opened, "read": read}}))
"""


def measure(tree: Path, data: Path, size: int) -> dict[str, float]:
    """In a fresh process started in `tree`, so that it imports that tree's featurepipe."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FEATUREPIPE_CACHE_DIR": tmp, "FEATUREPIPE_CACHE_BYTES": "1"}
        return json.loads(fresh_python(ONE.format(data=str(data.resolve()), size=size), env=env, cwd=tree))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a tree holding the featurepipe package before")
    ap.add_argument("--after", type=Path, default=ROOT)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    trees = {"before": a.before, "after": a.after}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(a.rounds):
        for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:  # neither always goes first
            runs[name].append(measure(trees[name], a.data, a.size))
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.4f} s" for k, v in runs[name][-1].items()
                                                  if k != "images"), flush=True)
    n = runs["before"][0]["images"]
    print(f"\nbest of {a.rounds}, {n} images at {a.size}x{a.size}x1:")
    print("| | key | fill | open | first read of every row |")
    print("|---|---|---|---|---|")
    best = {name: {k: min(run[k] for run in rs) for k in ("key", "fill", "open", "read")} for name, rs in runs.items()}
    for name in trees:
        print(f"| {name} | " + " | ".join(f"{best[name][k]:.4f} s" for k in ("key", "fill", "open", "read")) + " |")
    print("| after / before | " + " | ".join(f"{best['after'][k] / best['before'][k]:.2f}"
                                             for k in ("key", "fill", "open", "read")) + " |")


if __name__ == "__main__":
    main()
