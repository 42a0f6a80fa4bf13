"""Does featurepipe survive a realistically broken archive, and does skipping cost accuracy?

Writes a MedMNIST .npz out as an image folder twice (train/val/test class folders, PNG): a clean copy,
and a copy where a fraction of the files is broken in the ways real archives are (empty, truncated,
an error page or a Git LFS pointer saved as the image, random bytes, damaged pixel data), a few more
are stored in odd but valid ways (palette, grey+alpha, RGB, RGBA, EXIF-rotated: all must be read as
the same pixels), and junk lies around (.DS_Store, Thumbs.db, __MACOSX/, notes). Then runs the same
pipeline with the same options and seed on both and prints: whether skipped.csv lists exactly the
broken files, and the test accuracy of every model on both copies, for each training seed.

  python scripts/corrupted_copy_benchmark.py --npz ../shared/data/pneumoniamnist.npz --out /tmp/fp-corrupt \
      [--train-seeds 0,1,2] [--epochs 5] [--heads logreg]

Runs already finished under --out (compare/summary.json present) are reused, so seeds can be added later.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

BROKEN = ("empty", "truncated-half", "truncated-header", "html-error-page", "git-lfs-pointer", "random-bytes",
          "damaged-pixels")
ODD = ("palette", "grey+alpha", "rgb", "rgba", "exif-rotated")


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def broken(kind: str, good: bytes, rng: np.random.Generator) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated-half":
        return good[: len(good) // 2]
    if kind == "truncated-header":
        return good[:40]
    if kind == "html-error-page":
        return b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>\n"
    if kind == "git-lfs-pointer":
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 812\n"
    if kind == "random-bytes":
        return rng.integers(0, 256, len(good), dtype=np.uint8).tobytes()
    if kind == "damaged-pixels":
        start = good.index(b"IDAT") + 4  # the compressed pixels: the CRC and zlib stream no longer check out
        return good[:start] + rng.integers(0, 256, 24, dtype=np.uint8).tobytes() + good[start + 24:]
    raise ValueError(kind)


def odd(kind: str, g: np.ndarray) -> bytes:
    """The same grey pixels, stored another way."""
    if kind == "palette":
        img = Image.frombytes("P", (g.shape[1], g.shape[0]), g.tobytes())
        img.putpalette([v for i in range(256) for v in (i, i, i)])
        return png(img)
    if kind == "grey+alpha":
        return png(Image.fromarray(g, "L").convert("LA"))
    if kind == "rgb":
        return png(Image.fromarray(g, "L").convert("RGB"))
    if kind == "rgba":
        return png(Image.fromarray(g, "L").convert("RGBA"))
    if kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated; a viewer (and featurepipe) turns it back
        return png(Image.fromarray(np.ascontiguousarray(np.rot90(g, 1)), "L"), exif=exif)
    raise ValueError(kind)


def write_copies(npz: Path, out: Path, fraction: float, seed: int) -> dict[str, str]:
    data = np.load(npz)
    rng = np.random.default_rng(seed)
    files = []
    for split in ("train", "val", "test"):
        for i, (img, label) in enumerate(zip(data[f"{split}_images"], np.asarray(data[f"{split}_labels"]).reshape(-1))):
            files.append((f"{split}/{int(label)}/{split}_{i:05d}.png", img))
    picks = rng.permutation(len(files))
    n_broken, n_odd = round(fraction * len(files)), round(0.02 * len(files))
    broken_ids = {files[k][0]: BROKEN[j % len(BROKEN)] for j, k in enumerate(picks[:n_broken])}
    odd_ids = {files[k][0]: ODD[j % len(ODD)] for j, k in enumerate(picks[n_broken:n_broken + n_odd])}
    for rel, img in files:
        good = png(Image.fromarray(img, "L"))
        for copy in ("clean", "corrupt"):
            path = out / copy / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            content = good
            if copy == "corrupt" and rel in broken_ids:
                content = broken(broken_ids[rel], good, rng)
            elif copy == "corrupt" and rel in odd_ids:
                content = odd(odd_ids[rel], img)
            path.write_bytes(content)
    corrupt = out / "corrupt"
    for folder in sorted({p.parent for p in corrupt.rglob("*.png")}):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
        (folder / "Thumbs.db").write_bytes(bytes(128))
    (corrupt / "train" / "notes.txt").write_text("exported from PACS, do not share\n")
    for rel in list(broken_ids)[:20]:
        junk = corrupt / "__MACOSX" / Path(rel).parent / f"._{Path(rel).name}"
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    with (out / "broken.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id", "how"), *sorted(broken_ids.items())])
    return broken_ids


def featurepipe(*args: str) -> None:
    cmd = [sys.executable, "-m", "featurepipe", *map(str, args)]
    print("$ featurepipe " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def test_accuracy(run: Path, model: str, keep: set[str] | None = None) -> tuple[float, int]:
    path = run / ("cnn/test_predictions.csv" if model == "cnn" else f"heads/{model}.test_predictions.csv")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if keep is None or r["id"] in keep]
    return float(np.mean([r["true"] == r["pred"] for r in rows])), len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npz", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="scratch folder (outside the repository)")
    ap.add_argument("--fraction", type=float, default=0.05, help="share of files to break")
    ap.add_argument("--seed", type=int, default=0, help="which files break, and how")
    ap.add_argument("--train-seeds", default="0", help="train-cnn --seed values, comma-separated")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--heads", default="logreg")
    a = ap.parse_args()
    seeds = [int(x) for x in a.train_seeds.split(",")]

    if (a.out / "broken.csv").exists():
        with (a.out / "broken.csv").open(newline="") as f:
            broken_ids = {r["id"]: r["how"] for r in csv.DictReader(f)}
    else:
        broken_ids = write_copies(a.npz, a.out, a.fraction, a.seed)
    print(f"{len(broken_ids)} of {sum(1 for _ in (a.out / 'clean').rglob('*.png'))} files broken in {a.out / 'corrupt'}: "
          + ", ".join(f"{how} {n}" for how, n in sorted(Counter(broken_ids.values()).items())))
    for seed in seeds:
        for copy in ("clean", "corrupt"):
            run = a.out / f"run-{copy}-s{seed}"
            if (run / "compare" / "summary.json").exists():
                continue
            featurepipe("train-cnn", "--data", a.out / copy, "--out", run, "--overwrite", "--epochs", a.epochs,
                        "--seed", seed)
            featurepipe("extract", "--run", run)
            featurepipe("fit-heads", "--run", run, "--heads", a.heads)
            featurepipe("compare", "--run", run)

    for seed in seeds:
        with (a.out / f"run-corrupt-s{seed}" / "skipped.csv").open(newline="") as f:
            skipped = {r["id"] for r in csv.DictReader(f)}
        print(f"seed {seed}: skipped.csv has {len(skipped)} rows; exactly the broken files: {skipped == set(broken_ids)} "
              f"(missed {len(set(broken_ids) - skipped)}, wrongly skipped {len(skipped - set(broken_ids))})")
    print("\n| model | seed | clean: test acc (n) | corrupt: test acc (n) | difference | clean, on the corrupt run's "
          "test ids |")
    print("|---|---|---|---|---|---|")
    for model in ["cnn", *a.heads.split(",")]:
        diffs = []
        for seed in seeds:
            clean_run, corrupt_run = a.out / f"run-clean-s{seed}", a.out / f"run-corrupt-s{seed}"
            surviving = set(json.loads((corrupt_run / "splits.json").read_text())["test"])
            clean, n_clean = test_accuracy(clean_run, model)
            corrupt, n_corrupt = test_accuracy(corrupt_run, model)
            same, _ = test_accuracy(clean_run, model, surviving)
            diffs.append(corrupt - clean)
            print(f"| {model} | {seed} | {clean:.4f} ({n_clean}) | {corrupt:.4f} ({n_corrupt}) "
                  f"| {100 * (corrupt - clean):+.1f} pt | {same:.4f} |")
        if len(seeds) > 1:
            print(f"| {model} | mean | | | {100 * np.mean(diffs):+.1f} pt (sd {100 * np.std(diffs, ddof=1):.1f}) | |")


if __name__ == "__main__":
    main()
