"""Issue 21's before/after figures: fp32 against the precision `--amp` chooses by default (auto), and
optionally bf16 forced (`--amp`), on the issue's two fixed configurations:

  A  brain-mri4-small, --arch efficientnet_lite0 --weights imagenet --img-size 160 --epochs 4
  B  PneumoniaMNIST,   --arch sixblock --epochs 2

    python -m scripts.bench amp [--configs A,B] [--modes fp32,auto] [--seeds 0] [--work DIR]

For each configuration, seed and mode it runs train-cnn as a user does (a fresh process; its wall
time, start-up included) and extract (a fresh process; the seconds of the extract call alone, after
the interpreter, torch and featurepipe are loaded), then fits logreg and svm heads on the features
(`--tune none`). It prints, per mode, train-cnn and extract seconds, their ratio to fp32's, the CNN's
and the best head's test accuracy, and how the mode's features of the fp32-trained CNN compare with
fp32's for each of --feature-modes (mean and lowest cosine per image, largest absolute difference over
the largest value, NaN/inf count, heads fitted on them), so that bf16's accuracy is checked apart
from its training.

Where auto resolves to fp32 (a CPU without native bf16: every AVX2-only one) the auto rows measure
what the choice itself costs (nothing: the ratios are 1 within the machine's noise). On a CPU with
AVX512-BF16 or AMX, or a GPU (add --device cuda), auto is the new default to compare. Run it on a
quiet machine: the rates of a shared one swing by tens of percent, and `uptime`'s load is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from featurepipe.features import read_split
from featurepipe.runs import run_paths
from scripts import common
from scripts.common import DATA, fresh_python
CONFIGS = {
    "A": (DATA / "brain-mri4-small", ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--img-size", "160",
                                      "--epochs", "4"]),
    "B": (DATA / "pneumoniamnist.npz", ["--arch", "sixblock", "--epochs", "2"]),
}
MODES = {"fp32": ["--no-amp"], "auto": [], "bf16": ["--amp"]}  # bf16: forced, on every pass
HEADS = "logreg,svm"
SPLITS = ("train", "val", "test")


def featurepipe(*args: str) -> float:
    """Wall seconds of a featurepipe command in a fresh process; its output goes to the terminal on failure."""
    t0 = time.perf_counter()
    result = common.featurepipe(*args)
    if result.returncode:
        sys.exit(f"featurepipe {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def extract_seconds(run: Path, mode: str, device: str) -> float:
    """The extract call alone, in a fresh process: the interpreter's, torch's and featurepipe's start-up
    are not the precision's doing."""
    amp = {"fp32": False, "auto": None, "bf16": True}[mode]
    return float(fresh_python(f"import time\nfrom featurepipe.extract import extract\n"
                              f"t0 = time.perf_counter(); extract({str(run)!r}, device={device!r}, amp={amp!r})\n"
                              "print(time.perf_counter() - t0)"))


def h5py_precision(path: Path) -> str:
    import h5py

    with h5py.File(path) as h5:
        return str(h5.attrs["precision"])


def best_head(run: Path) -> tuple[str, float]:
    accuracy = {h: json.loads(run_paths(run).head_info(h).read_text())["test"]["accuracy"] for h in HEADS.split(",")}
    name = max(accuracy, key=accuracy.get)
    return name, accuracy[name]


def cnn_accuracy(run: Path, features: Path) -> float:
    """The CNN's test accuracy computed from a features file: its linear head applied to the test split's
    penultimate features (so: with that file's forward pass)."""
    import torch

    from featurepipe.models import load_checkpoint

    net, _ = load_checkpoint(run_paths(run).checkpoint, "cpu")
    test = read_split(features, "test")
    with torch.inference_mode():
        predicted = net.eval().head(torch.from_numpy(test.features)).argmax(1).numpy()
    return float((predicted == test.labels).mean())


def feature_agreement(a: Path, b: Path) -> dict[str, float]:
    """Features file `a` against `b` (fp32's), over all splits: per-image cosine similarity, the largest
    absolute difference relative to b's largest value, and how many of a's values are not finite."""
    x = np.concatenate([read_split(a, s).features for s in SPLITS]).astype(np.float64)
    y = np.concatenate([read_split(b, s).features for s in SPLITS]).astype(np.float64)
    finite = np.isfinite(x).all(axis=1)
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    return {"cos_mean": float(cos[finite].mean()), "cos_min": float(cos[finite].min()),
            "max_abs_diff_rel": float(np.abs(x - y)[finite].max() / np.abs(y).max()),
            "not_finite": int((~np.isfinite(x)).sum())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="A,B", help="comma-separated: A, B")
    parser.add_argument("--modes", default="fp32,auto", help="comma-separated: fp32 (always run), auto, bf16")
    parser.add_argument("--feature-modes", default="bf16",
                        help="comma-separated modes (auto, bf16) whose features of the fp32-trained CNN are compared "
                             "with fp32's; '' for none")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (as the commands' --device)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featurepipe-bench-amp"),
                        help="folder for the runs (emptied first)")
    args = parser.parse_args(argv)
    modes = ["fp32", *(m for m in args.modes.split(",") if m != "fp32")]
    feature_modes = [m for m in args.feature_modes.split(",") if m and m != "fp32"]
    unknown = (set(modes) | set(feature_modes)) - set(MODES) or set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configuration or mode: {', '.join(sorted(unknown))}")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    import torch

    from featurepipe.device import choose_precision, native_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, native bf16: "
          f"{native_bf16() or 'none'}; load average at start {os.getloadavg()}")
    print("| config | seed | mode | precision (forward / step) | train-cnn s | speed-up | extract s | speed-up | "
          "CNN test acc | best head test acc |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    device = torch.device(args.device)
    for config in args.configs.split(","):
        data, options = CONFIGS[config]
        arch = options[options.index("--arch") + 1]
        for seed in args.seeds.split(","):
            base: dict[str, float] = {}
            fp32_run = args.work / f"{config}-{seed}-fp32"
            for mode in modes:
                run = args.work / f"{config}-{seed}-{mode}"
                train_s = featurepipe("train-cnn", "--data", str(data), "--out", str(run), *options, "--seed", seed,
                                      "--device", args.device, *MODES[mode])
                extract_s = extract_seconds(run, mode, args.device)
                featurepipe("fit-heads", "--run", str(run), "--heads", HEADS, "--tune", "none")
                paths = run_paths(run)
                cnn = json.loads(paths.cnn_metrics.read_text())["test"]["accuracy"]
                head, head_acc = best_head(run)
                precision = json.loads(paths.config.read_text())["train"]["resolved"]["precision"]
                base = base or {"train": train_s, "extract": extract_s}
                print(f"| {config} ({arch}) | {seed} | {mode} | {precision['forward']} / {precision['train_step']} | "
                      f"{train_s:.1f} | {base['train'] / train_s:.2f} | {extract_s:.2f} | "
                      f"{base['extract'] / extract_s:.2f} | {cnn:.4f} | {head} {head_acc:.4f} |", flush=True)
            for mode in feature_modes:  # this mode's forward pass on the fp32-trained CNN, against fp32's features
                twin = args.work / f"{config}-{seed}-fp32-as-{mode}"
                shutil.copytree(fp32_run, twin)
                twin_h5, fp32_h5 = run_paths(twin).features, run_paths(fp32_run).features
                twin_h5.unlink()
                extract_s = extract_seconds(twin, mode, args.device)
                featurepipe("fit-heads", "--run", str(twin), "--heads", HEADS, "--tune", "none")
                a = feature_agreement(twin_h5, fp32_h5)
                head, head_acc = best_head(twin)
                print(f"features of {config} seed {seed}'s fp32 CNN extracted as {mode} "
                      f"({h5py_precision(twin_h5)}, {extract_s:.2f} s) against fp32's: cosine per image "
                      f"mean {a['cos_mean']:.6f}, lowest {a['cos_min']:.6f}; largest |difference| "
                      f"{a['max_abs_diff_rel']:.4f} of the largest value; {a['not_finite']} values not finite; "
                      f"CNN test accuracy {cnn_accuracy(twin, twin_h5):.4f} (fp32: "
                      f"{cnn_accuracy(fp32_run, fp32_h5):.4f}); heads fitted on them: best {head} "
                      f"test accuracy {head_acc:.4f} (on fp32's: {'%s %.4f' % best_head(fp32_run)})", flush=True)
    print(f"load average at the end {os.getloadavg()}; auto on this machine: "
          f"{choose_precision(device, None, 'sixblock').reason}")


if __name__ == "__main__":
    main()
