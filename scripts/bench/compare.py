"""Wall time of `featurepipe compare` on a finished run, as a user would see it (fresh process, imports
included), without and with Grad-CAM. Writes into a temporary folder, so the run's own report is untouched.

    python -m scripts.bench compare artifacts/pneu [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from featurepipe.runs import run_paths
from scripts.common import featurepipe


def timed_compare(run: str, out: Path, gradcam: bool) -> tuple[float, dict]:
    t0 = time.perf_counter()
    # --overwrite: every call after the first writes over the same folder's files.
    featurepipe("compare", "--run", run, "--out", out, "--overwrite", "--gradcam" if gradcam else "--no-gradcam",
                check=True)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "summary.json").read_text())["timing"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    summary = json.loads(run_paths(args.run).config.read_text())
    print(f"run {args.run}: {summary['model']['arch']} on {summary['data']['source']}")
    with tempfile.TemporaryDirectory() as tmp:
        for gradcam in (False, True):
            walls, inner = [], []
            for _ in range(args.repeat):
                wall, timing = timed_compare(args.run, Path(tmp) / "out", gradcam)
                walls.append(wall)
                inner.append(timing)
            label = "with Grad-CAM" if gradcam else "--no-gradcam "
            print(f"compare {label}: wall {statistics.median(walls):5.1f} s median of {args.repeat} "
                  f"({', '.join(f'{w:.1f}' for w in walls)}); inside compare excluding Grad-CAM "
                  f"{statistics.median(t['compare_seconds_excluding_gradcam'] for t in inner):.1f} s, "
                  f"Grad-CAM {statistics.median(t['gradcam_seconds'] for t in inner):.1f} s")


if __name__ == "__main__":
    main()
