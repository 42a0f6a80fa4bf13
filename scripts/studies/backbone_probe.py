"""How well frozen ImageNet features of several pretrained backbones, at several sizes, separate a run's
classes: a cheap look before paying for a fine-tuning run.

    python -m scripts.studies.backbone_probe RUN [--archs efficientnet_lite0@160,efficientnet_lite2@260]
                                                      [--heads logreg,svm]

RUN is any run that has done train-cnn (its images, splits and intensity window are used; its model is
not). Each backbone embeds train, val and test at the given size, as `extract`'s frozen arm does; each
head's grid is chosen on val and scored on test, as fit-heads and compare do. The measurement behind
docs/design.md's entry on EfficientNet-Lite1 and -Lite2.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe.files import read_json
from featurepipe.heads import parse_heads
from featurepipe.heads.fitting import choose, fit_chosen, one_thread_per_job
from featurepipe.heads.registry import HEADS
from featurepipe.models import ARCHS, create_model
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths


def run_splits(run: str) -> tuple[fdata.Catalog, dict[str, np.ndarray], tuple[float, float]]:
    """The run's images, its train/val/test indices into them, and its intensity window."""
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    catalog = cfg.train.scan(cfg.data.source)
    window = tuple(cfg.sections["train"]["resolved"]["window"])
    return catalog, fdata.assign_splits(catalog, cfg.seed, read_json(paths.splits)), window


def frozen_features(catalog: fdata.Catalog, splits: dict[str, np.ndarray], window: tuple[float, float], arch: str,
                    size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (features, labels)}: the pretrained backbone's embedding of the run's images at `size` px."""
    mean, std = ARCHS[arch].normalisation("imagenet")
    net = create_model(arch, len(catalog.class_names), 3, mean, std, weights="imagenet", window=window).eval()
    out = {}
    for split, idx in splits.items():
        ds = fdata.ImageDataset(catalog.store, idx, catalog.labels[idx], size, 3)
        images = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
        with torch.no_grad():
            features = torch.cat([net.forward_features(images[a:a + 32]) for a in range(0, len(images), 32)])
        out[split] = (features.numpy(), np.asarray(catalog.labels[idx]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--archs", default="efficientnet_lite0@160,efficientnet_lite1@240,efficientnet_lite2@260")
    parser.add_argument("--heads", default="logreg,svm")
    args = parser.parse_args()
    print("| backbone @ px | embed s | head | chosen on val | val accuracy | test accuracy |\n"
          "|---|---:|---|---|---:|---:|")
    catalog, splits, window = run_splits(args.run)
    for item in args.archs.split(","):
        arch, size = item.split("@")
        t0 = time.perf_counter()
        f = frozen_features(catalog, splits, window, arch, int(size))
        seconds = time.perf_counter() - t0
        with one_thread_per_job():
            for name in parse_heads(args.heads):
                spec = HEADS[name]
                params, _, _ = choose(spec, *f["train"], *f["val"], "val", 0, 2)
                model = fit_chosen(spec, params, *f["train"], 0, 2)
                val, test = (float(np.mean(model.predict(f[s][0]) == f[s][1])) for s in ("val", "test"))
                print(f"| {arch} @ {size} | {seconds:.0f} | {name} | {params} | {val:.4f} | {test:.4f} |", flush=True)


if __name__ == "__main__":
    main()
