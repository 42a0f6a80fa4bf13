"""`featurepipe compare`: one run's report (`compare`), or several runs side by side (`compare_runs`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import report
from featurepipe.files import write_json, write_text
from featurepipe.progress import log
from featurepipe.report.csv_files import metrics_csv, per_class_csv
from featurepipe.report.documents import run_document, runs_document, shift_warning
from featurepipe.report.figures import RUN_FIGURES, run_figures, runs_figures
from featurepipe.report.gallery import (GRADCAM_SIZE, failure_row, gallery_figure, gradcam_figure, images_or_note,
                                        top_losses)
from featurepipe.report.inputs import Inputs, features_of, load_all, load_val
from featurepipe.report.scoring import best_words, score_run, val_to_test
from featurepipe.run_config import RunConfig
from featurepipe.runs import check_output, environment, is_crossval, is_run, run_paths

MIN_RESAMPLES = 1000
# What compare writes into its folder: with --out, a user's files of these names are not replaced
# without --overwrite (RUN/compare is the run's own).
RUN_FILES = ("per_class.csv", "metrics.csv", "classification_reports.txt", "summary.md", "report.html", "summary.json",
             *(f"{name}.png" for name in RUN_FIGURES))
RUNS_FILES = ("summary.md", "report.html", "summary.json", "accuracy.png", "macro_f1.png")


def check_out(out: Path, n_runs: int, overwrite: bool = False) -> None:
    """Refuse, before any work, an --out that cannot be written or holds a user's files compare would
    replace; inside a run or a cross-validation (RUN/compare given as --out) the files are compare's own."""
    out = Path(out).expanduser()
    ours = any(is_run(p) or is_crossval(p) for p in Path(os.path.abspath(out)).parents)
    check_output(out, "--out", folder=True, overwrite=overwrite,
                 beside=() if ours else tuple(out / name for name in (RUN_FILES if n_runs == 1 else RUNS_FILES)))


@dataclass
class CompareOptions:
    resamples: int = 2000  # stratified bootstrap resamples for every interval
    gradcam: bool = True

    def validate(self) -> None:
        if self.resamples < MIN_RESAMPLES:
            raise FeaturepipeError(
                f"--bootstrap {self.resamples}: use at least {MIN_RESAMPLES} resamples for stable 95% intervals"
            )


def compare(run: str | Path, out: str | Path | None = None, options: CompareOptions | None = None) -> dict[str, Any]:
    """Compare the heads with the CNN of one run; writes into `out` (default RUN/compare)."""
    options = options or CompareOptions()
    options.validate()
    started = time.perf_counter()
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    inputs = load_all(cfg)
    preds = inputs.preds
    out = Path(out) if out is not None else paths.compare
    ref = preds["cnn"]
    summary = {
        "test_size": len(ref.ids),
        "class_names": ref.class_names,
        "class_counts": np.bincount(ref.y_true, minlength=len(ref.class_names)).tolist(),
        **score_run(cfg, inputs, options.resamples),
        "heads": {n: _head_choice(inputs.records[n]) for n in preds if n != "cnn"},
        "features": {n: features_of(n, cfg, inputs.records[n]) for n in preds},
        "val_to_test": shift_check(cfg, inputs),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {"path": str(paths.root), "arch": cfg.model.arch, "seed": cfg.seed, "data": cfg.data.source,
                "img_size": cfg.model.img_size},
        "environment": environment(),
    }

    figures = run_figures(paths, preds, summary, out)
    cam_seconds = 0.0
    notes: dict[str, str] = {}
    failures = top_losses(preds)
    images = images_or_note(cfg, [ref.ids[i] for i in failures], notes)
    if images is not None:
        figures["top_losses"] = gallery_figure(preds, failures, images, out / "top_losses.png")
        if options.gradcam:
            t0 = time.perf_counter()
            figures["gradcam"] = gradcam_figure(paths, ref, failures[:GRADCAM_SIZE], images[:GRADCAM_SIZE],
                                                out / "gradcam.png")
            cam_seconds = time.perf_counter() - t0
    summary["failures"] = [failure_row(preds, i) for i in failures]
    summary["figures"] = {k: v.name for k, v in figures.items()}
    for stale in set(RUN_FIGURES) - set(figures):
        (out / f"{stale}.png").unlink(missing_ok=True)  # e.g. gradcam.png of an earlier compare, now --no-gradcam

    write_text(out / "per_class.csv", per_class_csv(summary["per_class"]))
    write_text(out / "metrics.csv", metrics_csv(summary["models"]))
    write_text(out / "classification_reports.txt",
               "".join(f"== {name} ==\n{report(p)}\n" for name, p in preds.items()))
    doc = run_document(summary, cfg, figures, notes)
    write_text(out / "summary.md", doc.markdown(out))
    write_text(out / "report.html", doc.html())
    summary["timing"] = {"compare_seconds_excluding_gradcam": round(time.perf_counter() - started - cam_seconds, 2),
                         "gradcam_seconds": round(cam_seconds, 2)}
    write_json(out / "summary.json", summary)
    if warning := shift_warning(summary["val_to_test"]):
        log(f"warning: {warning}")
    log(f"best on test accuracy: {best_words(summary['models'])}; "
        f"{summary['timing']['compare_seconds_excluding_gradcam']:.1f} s"
        + (f" + Grad-CAM {cam_seconds:.1f} s" if options.gradcam else "") + f" → {out / 'report.html'}")
    return summary


def shift_check(cfg: RunConfig, inputs: Inputs) -> dict[str, Any]:
    """scoring.val_to_test where test may come from elsewhere. Where featurepipe drew val and test from one pool
    (its own split, a crossval fold), a drop between them is chance or choosing on val, never another site."""
    if cfg.data.test_given is False:
        return {"models": {}, "shifted": [], "one_pool": True}
    preds = inputs.preds
    return {**val_to_test(load_val(cfg, [n for n in preds if cfg.val_held_out(n)]), preds, inputs.records),
            "not_held_out": [n for n in preds if not cfg.val_held_out(n)]}


def _head_choice(info: dict[str, Any]) -> dict[str, Any]:
    return {"params": info.get("params", {}), "val_macro_f1": info.get("val_macro_f1")}


def compare_runs(runs: list[str | Path], out: str | Path | None, options: CompareOptions | None = None) -> dict[str, Any]:
    """One run: its full report (see `compare`). Several: side by side in one table and chart, in `out`."""
    options = options or CompareOptions()
    if len(runs) == 1 and is_crossval(runs[0]):
        from featurepipe.report.pooled import compare_crossval

        return compare_crossval(runs[0], out, options)
    if len(runs) == 1:
        return compare(runs[0], out, options)
    options.validate()
    if out is None:
        raise FeaturepipeError("--out: required when comparing several runs; name a folder for the joint report")
    if len({Path(r).resolve() for r in runs}) < len(runs):
        raise FeaturepipeError("--run: the same run is given twice; give each run once")
    out = Path(out)
    labels = _labels([Path(r) for r in runs])
    results: dict[str, Any] = {}
    test_ids, class_names = {}, None
    for label, run in zip(labels, runs):
        paths = run_paths(run)
        cfg = RunConfig.load(paths)
        inputs = load_all(cfg)
        preds = inputs.preds
        if class_names is not None and preds["cnn"].class_names != class_names:
            raise FeaturepipeError(f"--run {run}: its classes ({', '.join(preds['cnn'].class_names)}) differ from "
                                   f"the first run's ({', '.join(class_names)}); compare runs of one task")
        class_names = preds["cnn"].class_names
        test_ids[label] = preds["cnn"].ids
        evaluated = score_run(cfg, inputs, options.resamples)
        results[label] = {"path": str(paths.root), "arch": cfg.model.arch, "seed": cfg.seed,
                          "data": cfg.data.source, "test_size": len(preds["cnn"].ids),
                          "models": evaluated["models"], "tests": evaluated["tests"],
                          "baseline": evaluated["baseline"]}
    same = len({tuple(ids) for ids in test_ids.values()}) == 1
    summary = {"class_names": class_names, "same_test_images": same, "runs": results,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": environment()}
    figures = runs_figures(results, out)
    summary["figures"] = {k: v.name for k, v in figures.items()}
    doc = runs_document(summary, figures)
    write_text(out / "summary.md", doc.markdown(out))
    write_text(out / "report.html", doc.html())
    write_json(out / "summary.json", summary)
    log(f"{len(runs)} runs side by side → {out / 'report.html'}")
    return summary


def _labels(runs: list[Path]) -> list[str]:
    """Short unique names: the folder name, with its parents added until the names differ."""
    for depth in range(1, max(len(r.resolve().parts) for r in runs) + 1):
        labels = ["/".join(r.resolve().parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in runs]
