"""A cross-validation in sequence against fold workers at once: wall time, and whether the results agree.

    python -m scripts.bench crossval_jobs [--data ../shared/data/brain-mri4-small] [--folds 5] [--workers 2]
                                          [--sequential-threads T] [--work DIR] [crossval options, e.g. --epochs 2]

Runs `featurepipe crossval` twice in fresh processes, into two folders of --work: all folds in sequence in
one process (torch's threads: every core this process may use, or T with --sequential-threads, pinned to
the first T), then the same command with --fold-workers W (each worker pinned to its share of the cores:
one thread each for 2 workers on 2 cores). Prints both wall times and the speed-up, whether the pooled
summaries agree (every figure but dates, paths, environment and timings) and how many of the folds'
prediction files are byte-identical. On a CPU a fold's last digits depend on its thread count (the order
of a parallel sum): with --sequential-threads equal to the workers' share every file must be identical;
with more threads in sequence, the probabilities may differ in their last digits.

Options it does not know go to both crossval commands unchanged. Full defaults on brain-mri4-small take
about 109 minutes in sequence on a 2-core CPU; `--epochs 2` makes a quick check of the machinery.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.common import DATA, ROOT

SAME_EXCEPT = ("created", "timing", "environment", "run")


def crossval(data: Path, out: Path, folds: int, extra: list[str], workers: int, threads: int | None) -> float:
    """Wall seconds of one crossval command in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cores = sorted(os.sched_getaffinity(0))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "featurepipe", "crossval", "--data", str(data), "--out", str(out),
               "--folds", str(folds), "--fold-workers", str(workers), *extra]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores[:threads])) if threads else None)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"crossval failed ({out}):\n{result.stderr[-3000:]}")
    return seconds


def comparable(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    for key in SAME_EXCEPT:
        summary.pop(key, None)
    for model in summary["models"].values():
        model.pop("fit_seconds", None)
        model.pop("predict_seconds_per_image", None)
    return summary


def main(argv: list[str] | None = None) -> None:
    # No abbreviations: --fold (crossval's) must not be taken for --folds.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=DATA / "brain-mri4-small")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="fold workers of the parallel run")
    parser.add_argument("--sequential-threads", type=int, default=None,
                        help="threads (and cores) of the sequential run; default: every core this process may use")
    parser.add_argument("--work", type=Path, default=None, help="folder for both cross-validations (default: temp)")
    args, extra = parser.parse_known_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="crossval-jobs-"))
    work.mkdir(parents=True, exist_ok=True)
    outs = {"sequence": work / "sequence", "workers": work / f"workers{args.workers}"}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    seconds = {"sequence": crossval(args.data, outs["sequence"], args.folds, extra, 1, args.sequential_threads),
               "workers": crossval(args.data, outs["workers"], args.folds, extra, args.workers, None)}
    files = sorted(p.relative_to(outs["sequence"]) for p in outs["sequence"].glob("fold*/**/*_predictions.csv"))
    same = [f for f in files if (outs["sequence"] / f).read_bytes() == (outs["workers"] / f).read_bytes()]
    pooled = [comparable(out / "compare" / "summary.json") for out in outs.values()]
    cores = len(os.sched_getaffinity(0))
    print(f"\n{args.data.name}, {args.folds} folds, {' '.join(extra) or 'defaults'}; {cores} cores")
    print(f"  in sequence ({args.sequential_threads or cores} thread(s)): {seconds['sequence'] / 60:8.1f} min")
    print(f"  {args.workers} fold workers ({max(1, cores // args.workers)} thread(s) each): "
          f"{seconds['workers'] / 60:8.1f} min   speed-up {seconds['sequence'] / seconds['workers']:.2f}x")
    print(f"  pooled summary identical: {pooled[0] == pooled[1]}")
    print(f"  fold prediction files byte-identical: {len(same)} of {len(files)}")
    for name in ("accuracy", "macro_f1"):
        print(f"  pooled {name}: " + ", ".join(
            f"{model} {pooled[0]['models'][model][name]:.4f}/{pooled[1]['models'][model][name]:.4f}"
            for model in pooled[0]["models"]) + "  (sequence/workers)")


if __name__ == "__main__":
    main()
