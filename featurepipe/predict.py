"""`featurepipe predict`: a run's CNN, one of its heads or the stack on new images.

Images are decoded exactly as for training (the checkpoint's size and channels, whole field of view),
embedded with the layer and TTA the head was fitted on (its json says which), batched, on the GPU
when there is one. Out comes a CSV: id, predicted class, one probability column per class.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurepipe import data as fdata
from featurepipe.data.images import IMAGE_EXTENSIONS
from featurepipe.data.sources import FileStore, _images_under
from featurepipe.device import autocast, choose_precision, images_per_pass, in_passes, resolve_device, to_device
from featurepipe.errors import FeaturepipeError
from featurepipe.files import csv_cell, write_text
from featurepipe.heads import NAMES, STACK, full_proba, load_head
from featurepipe.models import load_checkpoint
from featurepipe.progress import log, progress_bar
from featurepipe.run_config import RunConfig
from featurepipe.runs import RunPaths, check_output, is_frozen, run_paths, skipped_beside


class Predictor:
    """Probabilities of one model of a run for uint8 image batches, as the run's own files were made."""

    def __init__(self, paths: RunPaths, model: str, device: torch.device, amp: bool | None = None) -> None:
        self.run = RunConfig.load(paths)  # refuses a run whose training did not finish
        self.run.checkpoint  # refuses a run without its checkpoint before any loading
        self.net, self.meta = load_checkpoint(paths.checkpoint, device)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.precision = choose_precision(device, amp)
        self.per_pass = images_per_pass(self.net, self.meta["img_size"], self.precision.forward)
        self.class_names = self.meta["class_names"]
        self.device, self.model = device, model
        self.heads: dict[str, Any] = {}
        self.infos: dict[str, dict[str, Any]] = {}
        names = [model] if model != STACK else [model, *self._load(STACK)["inputs"]]
        for name in names:
            if name != "cnn":
                self._load(name)

    def _load(self, name: str) -> dict[str, Any]:
        paths = self.run.paths
        if name not in self.infos:
            # Frozen-features heads need the pretrained backbone's features, which predict does not compute.
            fitted = [h for h in self.run.fitted_heads() if not is_frozen(h)]
            if name not in NAMES or name not in fitted:
                raise FeaturepipeError(f"--model {name}: not a model of {paths.root}; choose cnn"
                                       + (f" or a fitted head: {', '.join(fitted)}" if fitted else ""))
            info = self.run.head_info(name)
            if info.get("class_names", self.class_names) != self.class_names:
                raise FeaturepipeError(f"{paths.head_info(name)}: its classes differ from the CNN's; "
                                       f"re-run featurepipe fit-heads --run {paths.root}")
            self.infos[name] = info
            self.heads[name] = load_head(paths, name, info)
        return self.infos[name]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = to_device(x, self.device)
        features: dict[tuple[str, str], np.ndarray] = {}

        def embedded(layer: str, tta: str) -> np.ndarray:
            if (layer, tta) not in features:
                with autocast(self.device, self.precision.forward):
                    f = in_passes(lambda part: self.net.embed(part, layer, tta), x, self.per_pass)
                    features[layer, tta] = f.float().cpu().numpy()
            return features[layer, tta]

        def proba(name: str) -> np.ndarray:
            if name == "cnn":
                tta = self.meta.get("tta", "none")  # checkpoints from before test-time flips: none
                with autocast(self.device, self.precision.forward):
                    logits = in_passes(lambda part: self.net.logits(part, tta), x, self.per_pass)
                return torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64)
            info, head = self.infos[name], self.heads[name]
            if name == STACK:
                X = np.hstack([proba(b) for b in info["inputs"]])
            else:
                setting = info.get("features", {})
                X = embedded(setting.get("layer", "penultimate"), setting.get("tta", "none"))
            return full_proba(head, X, len(self.class_names))

        return proba(self.model)


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given, and the images under folders (sorted, hidden ones skipped)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = _images_under(path)
            if not found:
                raise FeaturepipeError(f"{item}: no images in this folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif path.is_file() and path.suffix.lower() in (".npz", ".csv"):
            # A data source, not an image: decoding it would call a sound file unreadable ("fix or remove it").
            raise FeaturepipeError(f"{item}: predict takes image files or folders of images, not an .npz or CSV "
                                   "source; give its images, or embed it with featurepipe extract --data")
        elif path.is_file():
            files.append(path)
        else:
            raise FeaturepipeError(f"{item}: no such file or folder; give image files or folders of images")
    if not files:
        raise FeaturepipeError("predict: no input images given; pass image files or folders")
    return files


def predict(run: str | Path, model: str, inputs: list[str], out: str | Path | None = None, batch_size: int = 256,
            device: str = "auto", amp: bool | None = None, on_bad_image: str = "skip",
            overwrite: bool = False) -> tuple[list[str], np.ndarray, list[str]]:
    """Write the CSV to `out` (stdout without it); returns ids, probabilities and class names.

    Unreadable images are left out (listed on stderr and, with `out`, in OUT.skipped.csv), or stop the
    command with on_bad_image="error"."""
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size {batch_size}: must be at least 1")
    fdata.check_policy(on_bad_image)
    if out is not None:  # refused before any work, not after it
        out = check_output(Path(out), "--out", overwrite=overwrite, beside=(skipped_beside(Path(out)),))
    paths = run_paths(run)
    dev = resolve_device(device)
    predictor = Predictor(paths, model, dev, amp)
    files = image_files(inputs)
    ds = fdata.ImageDataset(FileStore(files), np.arange(len(files)), np.zeros(len(files)), predictor.meta["img_size"],
                            predictor.meta["in_channels"])
    loader = fdata.make_loader(ds, batch_size, pin_memory=dev.type == "cuda", once=True)
    probas, kept, skipped = [], [], []
    with progress_bar() as bar:
        task = bar.add_task(f"predict {model}", total=len(files), info="")
        for x, _, k, why in loader:
            if on_bad_image == "error":
                ds.check(k, why)
            good = [j for j, w in enumerate(why) if not w]
            skipped += [fdata.Skipped(str(files[int(k[j])]), "", "", w) for j, w in enumerate(why) if w]
            if good:
                probas.append(predictor(x[good]))
                kept += [int(k[j]) for j in good]
            bar.advance(task, len(x))
    if skipped and out is not None:
        fdata.save_skipped(skipped_beside(out), skipped)  # and warns, naming the first
    elif skipped:
        log(f"warning: skipped {len(skipped)} unreadable image(s): "
            + "; ".join(f"{s.id}: {s.reason}" for s in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not kept:  # nothing to predict: the first image's reason is the error
        raise fdata.UnreadableImage(skipped[0].id, skipped[0].reason)
    proba = np.concatenate(probas)
    ids = [str(files[i]) for i in kept]
    text = prediction_csv(ids, proba, predictor.class_names)
    if out is None:
        sys.stdout.write(text)
    else:
        write_text(Path(out), text)
        log(f"{model}: {len(ids)} images → {out}; {predictor.precision.describe(dev, training=False)}")
    return ids, proba, predictor.class_names


def prediction_csv(ids: list[str], proba: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "pred", *(f"p_{c}" for c in class_names)])
    for id_, row in zip(ids, proba):
        w.writerow([csv_cell(id_), csv_cell(class_names[int(row.argmax())]), *(f"{v:.6g}" for v in row)])
    return buf.getvalue()
