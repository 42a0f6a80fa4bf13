"""Heads fitted on the clean training images' features (what fit-heads does) against heads fitted on
features of augmented views of them too (what the CNN's last layer learned from), on a finished run.

    python -m scripts.studies.heads_on_views RUN [--views 2] [--heads svm,logreg,rf]

RUN needs train-cnn and extract. Each head's grid is chosen on val, as fit-heads does; the views are
drawn with the run's own augmentation preset (seed 0). Prints, for each head and training set, the
chosen hyperparameters and the val and test accuracy: the measurement behind docs/design.md's "A test
set from elsewhere" (on PneumoniaMNIST the views win on test and lose on val; on the small brain and
fundus sets they lose on both). Run it on a new data set before changing the default.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe.features import read_split
from featurepipe.files import read_json
from featurepipe.heads import parse_heads
from featurepipe.heads.fitting import choose, fit_chosen, one_thread_per_job
from featurepipe.heads.registry import HEADS
from featurepipe.models import load_checkpoint
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths


def augmented_views(run: str, k: int) -> np.ndarray:
    """(k * n_train, D): the CNN's embedding of k augmented views of every training image, view by view."""
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    net, meta = load_checkpoint(paths.checkpoint, torch.device("cpu"))
    net.eval()
    catalog = cfg.train.scan(cfg.data.source)
    idx = fdata.assign_splits(catalog, cfg.seed, read_json(paths.splits))["train"]
    ds = fdata.ImageDataset(catalog.store, idx, catalog.labels[idx], meta["img_size"], meta["in_channels"])
    images = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
    augment = fdata.augmentation(cfg.sections["train"]["resolved"]["augment"])
    torch.manual_seed(0)
    with torch.no_grad():
        return np.concatenate([net.embed(augment(net.scale(images[a:a + 128])) if augment else images[a:a + 128]).numpy()
                               for _ in range(k) for a in range(0, len(images), 128)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--heads", default="svm,logreg,rf")
    args = parser.parse_args()
    paths = run_paths(args.run)
    train, val, test = (read_split(paths.features, s) for s in ("train", "val", "test"))
    views = augmented_views(args.run, args.views)
    sets = {"clean": (train.features, train.labels),
            f"clean + {args.views} views": (np.concatenate([train.features, views]),
                                            np.tile(train.labels, args.views + 1)),
            f"{args.views} views": (views, np.tile(train.labels, args.views))}
    print("| head | fitted on | chosen on val | val accuracy | test accuracy |\n|---|---|---|---:|---:|")
    with one_thread_per_job():
        for name in parse_heads(args.heads):
            spec = HEADS[name]
            for label, (X, y) in sets.items():
                params, _, _ = choose(spec, X, y, val.features, val.labels, "val", 0, 2)
                model = fit_chosen(spec, params, X, y, 0, 2)
                accuracy = {s: float(np.mean(model.predict(f.features) == f.labels)) for s, f in (("val", val), ("test", test))}
                print(f"| {name} | {label} | {params} | {accuracy['val']:.4f} | {accuracy['test']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
