"""Where the CNN fails: its highest-loss test images, read back from the run's data, and Grad-CAM on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featurepipe import plots
from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions
from featurepipe.progress import log
from featurepipe.run_config import RunConfig
from featurepipe.runs import RunPaths

GALLERY_SIZE = 18
GRADCAM_SIZE = 6


def top_losses(preds: dict[str, Predictions]) -> list[int]:
    """Test rows where the CNN's loss (−log p of the true class) is highest, worst first."""
    ref = preds["cnn"]
    loss = -np.log(np.clip(ref.proba[np.arange(len(ref.ids)), ref.y_true], 1e-12, 1.0))
    return np.argsort(-loss, kind="stable")[:GALLERY_SIZE].tolist()


def failure_row(preds: dict[str, Predictions], i: int) -> dict[str, Any]:
    ref = preds["cnn"]
    names = ref.class_names
    return {
        "id": ref.ids[i], "true": names[ref.y_true[i]], "cnn_pred": names[ref.y_pred[i]],
        "cnn_p_pred": float(ref.proba[i].max()), "cnn_p_true": float(ref.proba[i, ref.y_true[i]]),
        "heads_right": [n for n, p in preds.items() if n != "cnn" and p.y_pred[i] == p.y_true[i]],
    }


def images_or_note(cfg: RunConfig, ids: list[str], notes: dict[str, str]):
    from featurepipe.explain import read_test_images

    try:
        return read_test_images(cfg, ids)
    except FeaturepipeError as e:
        # The numbers do not need the pixels; a report without pictures beats no report.
        notes["images"] = f"Gallery and Grad-CAM skipped: the test images could not be read ({e})."
        log(f"warning: {notes['images']}")
        return None


def gallery_figure(preds: dict[str, Predictions], rows: list[int], images: list[np.ndarray], path: Path) -> Path:
    ref = preds["cnn"]
    n_heads = len(preds) - 1
    captions, wrong = [], []
    for i in rows:
        f = failure_row(preds, i)
        captions.append(f"{_short(f['id'])}\ntrue {f['true']} · CNN {f['cnn_pred']} ({f['cnn_p_pred']:.2f})\n"
                        f"heads right: {len(f['heads_right'])}/{n_heads}")
        wrong.append(bool(ref.y_pred[i] != ref.y_true[i]))
    plots.image_gallery(images, captions, wrong, path,
                        f"The CNN's {len(rows)} highest-loss test images (red: misclassified; "
                        "p = the CNN's probability of its prediction)")
    return path


def gradcam_figure(paths: RunPaths, ref: Predictions, rows: list[int], images: list[np.ndarray],
                   path: Path) -> Path:
    from featurepipe.explain import gradcam
    from featurepipe.models import load_checkpoint

    net, _ = load_checkpoint(paths.checkpoint)
    batch = np.stack(images)
    pred, true = ref.y_pred[rows], ref.y_true[rows]
    cam_pred, cam_true = gradcam(net, batch, pred.tolist()), gradcam(net, batch, true.tolist())
    names = ref.class_names
    cams, titles = [], []
    for k, (i, p, t) in enumerate(zip(rows, pred, true)):
        # A right prediction has one map; a wrong one also shows what the CNN saw of the true class, on the
        # same colour scale, so weak evidence looks weak instead of being stretched to full red.
        scale = max(cam_pred[k].max(), cam_true[k].max(), 1e-12)
        cams.append([cam_pred[k] / scale] if p == t else [cam_pred[k] / scale, cam_true[k] / scale])
        titles.append([f"{_short(ref.ids[i])}\ntrue {names[t]}, CNN {names[p]}", f"evidence for {names[p]} (CNN)",
                       f"evidence for {names[t]} (true)"])
    plots.gradcam_grid(images, cams, titles, path,
                       "Grad-CAM of the CNN on its highest-loss test images (one colour scale per image; red: strongest)")
    return path


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
