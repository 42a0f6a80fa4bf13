"""The comparison: every model on the same test images, with the uncertainty a publication needs.

One run: `compare(RUN)` writes RUN/compare/ — summary.json (every figure), summary.md and a
self-contained report.html, metrics.csv, per_class.csv and the charts. Several runs:
`compare_runs([A, B], OUT)` puts them side by side in OUT/.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from featurepipe import plots, stats
from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, load_predictions, majority_baseline, per_class, report, scores
from featurepipe.progress import log
from featurepipe.render import Doc, Table
from featurepipe.run_config import RunConfig
from featurepipe.runs import RunPaths, csv_cell, environment, read_json, require, run_paths, write_json, write_text

MIN_RESAMPLES = 1000
LEVEL = 0.95
ALPHA = 0.05
GALLERY_SIZE = 18
GRADCAM_SIZE = 6
# Every chart of one run's comparison, saved as <name>.png in the report folder.
RUN_FIGURES = ("accuracy", "macro_f1", "confusion", "reliability", "roc", "training_curves", "top_losses", "gradcam")
PER_CLASS_FIELDS = ("class", "precision", "recall", "f1", "support", "tp", "tn", "fp", "fn")
METRIC_FIELDS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
                 "weighted_precision", "weighted_recall", "weighted_f1", "roc_auc", "log_loss", "ece",
                 "medmnist_auc", "medmnist_acc")


@dataclass
class CompareOptions:
    resamples: int = 2000  # stratified bootstrap resamples for every interval
    gradcam: bool = True

    def validate(self) -> None:
        if self.resamples < MIN_RESAMPLES:
            raise FeaturepipeError(
                f"--bootstrap {self.resamples}: use at least {MIN_RESAMPLES} resamples for stable 95% intervals"
            )


# ---------------------------------------------------------------------------------------------- inputs

def load_all(cfg: RunConfig) -> dict[str, Predictions]:
    """The CNN's and every head's test predictions, refused unless all cover the same test images."""
    paths, class_names = cfg.paths, cfg.class_names
    require(paths.predictions("cnn"), "CNN test predictions", f"run featurepipe train-cnn --out {paths.root} first")
    heads = cfg.fitted_heads()
    if not heads:
        raise FeaturepipeError(f"{paths.heads}: no fitted heads; run featurepipe fit-heads --run {paths.root} first")
    preds = {"cnn": load_predictions(paths.predictions("cnn"), class_names)}
    for name in heads:
        cfg.head_info(name)  # refuses a head of an older checkpoint
        preds[name] = load_predictions(paths.predictions(name), class_names)
    reference = preds["cnn"]
    for name, p in preds.items():
        if p.ids != reference.ids or not np.array_equal(p.y_true, reference.y_true):
            raise FeaturepipeError(
                f"{paths.predictions(name)}: covers other test images (or labels) than the CNN's; "
                f"re-run featurepipe extract and fit-heads --run {paths.root}"
            )
    return preds


def model_cost(paths: RunPaths, name: str) -> dict[str, float | None]:
    """Fit (training) time and prediction time per image, as train-cnn and fit-heads measured them."""
    source = paths.cnn_metrics if name == "cnn" else paths.head_info(name)
    info = read_json(source) if source.exists() else {}
    return {"fit_seconds": info.get("train_seconds" if name == "cnn" else "fit_seconds"),
            "predict_seconds_per_image": info.get("predict_seconds_per_image")}


def score_run(cfg: RunConfig, preds: dict[str, Predictions], resamples: int) -> dict[str, Any]:
    """`evaluate_models` with each model's fit and prediction times added to its scores, and the
    majority-class baseline (verdicts against a CNN that is not above it say so)."""
    evaluated = evaluate_models(preds, resamples, cfg.seed)
    for name, scores_ in evaluated["models"].items():
        scores_.update(model_cost(cfg.paths, name))
    ref = preds["cnn"]
    # Runs written before config.json kept class counts: the test split's own majority class instead.
    train_counts = cfg.data.counts.get("train") or np.bincount(ref.y_true, minlength=len(ref.class_names))
    evaluated["baseline"] = baseline(train_counts, ref, evaluated["models"]["cnn"])
    if not evaluated["baseline"]["cnn_above"]:
        for t in evaluated["tests"].values():
            t["verdict"] = _verdict(t, cnn_learned=False)
    return evaluated


# -------------------------------------------------------------------------------------------- statistics

def evaluate_models(preds: dict[str, Predictions], resamples: int, seed: int) -> dict[str, Any]:
    """Scores with bootstrap intervals for every model, and every head's paired tests against the CNN.

    All models are scored on the same resamples, so the intervals of a difference are paired too.
    """
    ref = preds["cnn"]
    n_classes = len(ref.class_names)
    idx = stats.stratified_resamples(ref.y_true, resamples, seed)
    models, boot = {}, {}
    for name, p in preds.items():
        boot[name] = {
            "accuracy": stats.accuracy_rows(p.y_true, p.y_pred, idx),
            "macro_f1": stats.macro_f1_rows(p.y_true, p.y_pred, idx, n_classes),
        }
        models[name] = scores(p) | {f"{k}_ci": stats.percentile_interval(v, LEVEL) for k, v in boot[name].items()}

    tests: dict[str, dict[str, Any]] = {}
    cnn_right = ref.y_pred == ref.y_true
    for name, p in preds.items():
        if name == "cnn":
            continue
        t: dict[str, Any] = {}
        for metric in ("accuracy", "macro_f1"):
            t[f"delta_{metric}"] = models[name][metric] - models["cnn"][metric]
            t[f"delta_{metric}_ci"] = stats.percentile_interval(boot[name][metric] - boot["cnn"][metric], LEVEL)
        mc = stats.mcnemar_exact(cnn_right, p.y_pred == p.y_true)
        t["mcnemar"] = {"cnn_only_right": mc.b, "head_only_right": mc.c, "p_value": mc.p_value}
        if n_classes == 2 and len(np.unique(ref.y_true)) == 2:
            d = stats.delong_test(ref.y_true, ref.proba[:, 1], p.proba[:, 1])
            t["delong"] = {"auc_cnn": d.auc_a, "auc_head": d.auc_b, "difference": d.difference, "z": d.z,
                           "p_value": d.p_value}
        tests[name] = t
    for test in ("mcnemar", "delong"):
        names = [n for n in tests if test in tests[n]]
        for n, adjusted in zip(names, stats.holm([tests[n][test]["p_value"] for n in names]) if names else []):
            tests[n][test]["p_holm"] = adjusted
    for t in tests.values():
        t["verdict"] = _verdict(t)
    return {
        "models": models,
        "per_class": {name: per_class(p) for name, p in preds.items()},
        "tests": tests,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "stratified": True,
                      "interval": "percentile"},
    }


# A head's significant win over a CNN that is not above the majority-class baseline: no evidence about heads.
UNTRAINED_WIN = "head better than a CNN that did not learn"


def _verdict(t: dict[str, Any], cnn_learned: bool = True) -> str:
    if t["mcnemar"]["p_holm"] >= ALPHA:
        return "no significant difference"
    if t["delta_accuracy"] > 0:
        return "head better" if cnn_learned else UNTRAINED_WIN
    return "CNN better"


def baseline(train_counts: list[int], ref: Predictions, cnn: dict[str, Any]) -> dict[str, Any]:
    """The majority-class baseline on the test images, and whether the CNN is above it: the lower end of
    its accuracy interval above the baseline's accuracy (the baseline is the same on every stratified
    resample, so this is the paired test too)."""
    base = majority_baseline(train_counts, ref)
    return {**base, "cnn_above": bool(cnn["accuracy_ci"][0] > base["accuracy"])}


# ---------------------------------------------------------------------------------------------- one run

def compare(run: str | Path, out: str | Path | None = None, options: CompareOptions | None = None) -> dict[str, Any]:
    """Compare the heads with the CNN of one run; writes into `out` (default RUN/compare)."""
    options = options or CompareOptions()
    options.validate()
    started = time.perf_counter()
    paths = run_paths(run)
    cfg = RunConfig.load(paths)
    preds = load_all(cfg)
    out = Path(out) if out is not None else paths.compare
    ref = preds["cnn"]
    summary = {
        "test_size": len(ref.ids),
        "class_names": ref.class_names,
        "class_counts": np.bincount(ref.y_true, minlength=len(ref.class_names)).tolist(),
        **score_run(cfg, preds, options.resamples),
        "heads": {n: _head_choice(paths, n) for n in preds if n != "cnn"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {"path": str(paths.root), "arch": cfg.model.arch, "seed": cfg.seed, "data": cfg.data.source,
                "img_size": cfg.model.img_size},
        "environment": environment(),
    }

    figures = _run_figures(paths, preds, summary, out)
    cam_seconds = 0.0
    notes: dict[str, str] = {}
    failures = _top_losses(preds)
    images = _images_or_note(cfg, [ref.ids[i] for i in failures], notes)
    if images is not None:
        figures["top_losses"] = _gallery(preds, failures, images, out / "top_losses.png")
        if options.gradcam:
            t0 = time.perf_counter()
            figures["gradcam"] = _gradcam_figure(paths, ref, failures[:GRADCAM_SIZE], images[:GRADCAM_SIZE],
                                                 out / "gradcam.png")
            cam_seconds = time.perf_counter() - t0
    summary["failures"] = [_failure_row(preds, i) for i in failures]
    summary["figures"] = {k: v.name for k, v in figures.items()}
    for stale in set(RUN_FIGURES) - set(figures):
        (out / f"{stale}.png").unlink(missing_ok=True)  # e.g. gradcam.png of an earlier compare, now --no-gradcam

    write_text(out / "per_class.csv", _per_class_csv(summary["per_class"]))
    write_text(out / "metrics.csv", _metrics_csv(summary["models"]))
    write_text(out / "classification_reports.txt",
               "".join(f"== {name} ==\n{report(p)}\n" for name, p in preds.items()))
    doc = run_document(summary, cfg, figures, notes)
    write_text(out / "summary.md", doc.markdown(out))
    write_text(out / "report.html", doc.html())
    summary["timing"] = {"compare_seconds_excluding_gradcam": round(time.perf_counter() - started - cam_seconds, 2),
                         "gradcam_seconds": round(cam_seconds, 2)}
    write_json(out / "summary.json", summary)
    best = max(summary["models"], key=lambda n: summary["models"][n]["accuracy"])
    log(f"best on test accuracy: {best} ({summary['models'][best]['accuracy']:.4f}); "
        f"{summary['timing']['compare_seconds_excluding_gradcam']:.1f} s"
        + (f" + Grad-CAM {cam_seconds:.1f} s" if options.gradcam else "") + f" → {out / 'report.html'}")
    return summary


def _head_choice(paths: RunPaths, name: str) -> dict[str, Any]:
    info = read_json(paths.head_info(name))
    return {"params": info.get("params", {}), "val_macro_f1": info.get("val_macro_f1")}


def _run_figures(paths: RunPaths, preds: dict[str, Predictions], summary: dict[str, Any],
                 out: Path) -> dict[str, Path]:
    models = summary["models"]
    n, arch = summary["test_size"], summary["run"]["arch"]
    figures = {}
    for metric, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        figures[metric] = out / f"{metric}.png"
        plots.metric_bars({k: m[metric] for k, m in models.items()}, figures[metric], metric,
                          f"Test {label}, {n} images ({arch} features), 95% bootstrap CI",
                          ci={k: m[f"{metric}_ci"] for k, m in models.items()},
                          baseline=(f"majority class ({summary['baseline']['class']})", summary["baseline"][metric]))
    figures["confusion"] = out / "confusion.png"
    plots.confusion_matrices(
        {k: confusion_matrix(p.y_true, p.y_pred, labels=np.arange(len(p.class_names))) for k, p in preds.items()},
        summary["class_names"], figures["confusion"])
    figures["reliability"] = out / "reliability.png"
    plots.reliability_diagrams({k: stats.reliability(p.y_true, p.proba) for k, p in preds.items()},
                               len(summary["class_names"]), figures["reliability"])
    if all(models[k]["roc_auc"] is not None for k in preds):
        figures["roc"] = out / "roc.png"
        binary = len(summary["class_names"]) == 2
        plots.roc_curves({k: (*_roc(p), models[k]["roc_auc"]) for k, p in preds.items()}, figures["roc"],
                         f"ROC, positive class '{summary['class_names'][1]}'" if binary
                         else "ROC, macro average of one-vs-rest curves")
    if paths.history.exists():
        figures["training_curves"] = out / "training_curves.png"
        best = read_json(paths.cnn_metrics).get("best_epoch") if paths.cnn_metrics.exists() else None
        plots.training_curves(_read_history(paths.history), figures["training_curves"], best_epoch=best)
    return figures


def _roc(p: Predictions) -> tuple[np.ndarray, np.ndarray]:
    if p.proba.shape[1] == 2:
        fpr, tpr, _ = roc_curve(p.y_true, p.proba[:, 1])
        return fpr, tpr
    grid = np.linspace(0, 1, 201)
    tprs = []
    for k in range(p.proba.shape[1]):
        fpr, tpr, _ = roc_curve(p.y_true == k, p.proba[:, k])
        tprs.append(np.interp(grid, fpr, tpr))
    return grid, np.mean(tprs, axis=0)


def _read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _top_losses(preds: dict[str, Predictions]) -> list[int]:
    """Test rows where the CNN's loss (−log p of the true class) is highest, worst first."""
    ref = preds["cnn"]
    loss = -np.log(np.clip(ref.proba[np.arange(len(ref.ids)), ref.y_true], 1e-12, 1.0))
    return np.argsort(-loss, kind="stable")[:GALLERY_SIZE].tolist()


def _failure_row(preds: dict[str, Predictions], i: int) -> dict[str, Any]:
    ref = preds["cnn"]
    names = ref.class_names
    return {
        "id": ref.ids[i], "true": names[ref.y_true[i]], "cnn_pred": names[ref.y_pred[i]],
        "cnn_p_pred": float(ref.proba[i].max()), "cnn_p_true": float(ref.proba[i, ref.y_true[i]]),
        "heads_right": [n for n, p in preds.items() if n != "cnn" and p.y_pred[i] == p.y_true[i]],
    }


def _images_or_note(cfg: RunConfig, ids: list[str], notes: dict[str, str]):
    from featurepipe.explain import read_test_images

    try:
        return read_test_images(cfg, ids)
    except FeaturepipeError as e:
        # The numbers do not need the pixels; a report without pictures beats no report.
        notes["images"] = f"Gallery and Grad-CAM skipped: the test images could not be read ({e})."
        log(f"warning: {notes['images']}")
        return None


def _gallery(preds: dict[str, Predictions], rows: list[int], images: list[np.ndarray], path: Path) -> Path:
    ref = preds["cnn"]
    n_heads = len(preds) - 1
    captions, wrong = [], []
    for i in rows:
        f = _failure_row(preds, i)
        captions.append(f"{_short(f['id'])}\ntrue {f['true']} · CNN {f['cnn_pred']} ({f['cnn_p_pred']:.2f})\n"
                        f"heads right: {len(f['heads_right'])}/{n_heads}")
        wrong.append(bool(ref.y_pred[i] != ref.y_true[i]))
    plots.image_gallery(images, captions, wrong, path,
                        f"The CNN's {len(rows)} highest-loss test images (red: misclassified; "
                        "p = the CNN's probability of its prediction)")
    return path


def _gradcam_figure(paths: RunPaths, ref: Predictions, rows: list[int], images: list[np.ndarray],
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


# ---------------------------------------------------------------------------------------------- files

def _per_class_csv(tables: dict[str, list[dict[str, Any]]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *PER_CLASS_FIELDS])
    for model, rows in tables.items():
        for r in rows:
            w.writerow([model, *(csv_cell(r[k]) if k == "class" else r[k] for k in PER_CLASS_FIELDS)])
    return buf.getvalue()


def _metrics_csv(models: dict[str, dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fields = [*METRIC_FIELDS, "accuracy_ci_low", "accuracy_ci_high", "macro_f1_ci_low", "macro_f1_ci_high",
              "fit_seconds", "predict_seconds_per_image"]
    w.writerow(["model", *fields])
    for name, m in models.items():
        flat = m | {"accuracy_ci_low": m["accuracy_ci"][0], "accuracy_ci_high": m["accuracy_ci"][1],
                    "macro_f1_ci_low": m["macro_f1_ci"][0], "macro_f1_ci_high": m["macro_f1_ci"][1]}
        w.writerow([name, *("" if flat.get(k) is None else flat[k] for k in fields)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- report

def _f(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci(v: float, ci: list[float], signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{v:{s}.4f} [{ci[0]:{s}.4f}, {ci[1]:{s}.4f}]"


def _p(p: float | None) -> str:
    return "—" if p is None else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.3g}"


def _duration(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"


def takeaway(models: dict[str, dict[str, Any]], tests: dict[str, dict[str, Any]],
             base: dict[str, Any] | None = None) -> str:
    """The result in words: whether the CNN learned, the best model, and which heads differ from the CNN beyond chance."""
    best = max(models, key=lambda n: models[n]["accuracy"])
    parts = []
    if base is not None and not base["cnn_above"]:
        parts.append(f"The CNN did not learn this task: its test accuracy {models['cnn']['accuracy']:.4f} (95% CI "
                     f"{models['cnn']['accuracy_ci'][0]:.4f}–{models['cnn']['accuracy_ci'][1]:.4f}) is not above the "
                     f"majority-class baseline {base['accuracy']:.4f} (always '{base['class']}'). A head beating it "
                     "is no evidence that heads beat a trained CNN; its features are those of a failed model.")
    parts.append(f"Best test accuracy: {best} ({models[best]['accuracy']:.4f}, 95% CI "
                 f"{models[best]['accuracy_ci'][0]:.4f}–{models[best]['accuracy_ci'][1]:.4f})"
                 + (f"; majority-class baseline {base['accuracy']:.4f}." if base is not None else "."))
    groups = {v: [n for n, t in tests.items() if t["verdict"] == v]
              for v in ("head better", "CNN better", "no significant difference")}
    if groups["head better"]:
        parts.append(f"Significantly better than the CNN: {', '.join(groups['head better'])}.")
    failed = [n for n, t in tests.items() if t["verdict"] == UNTRAINED_WIN]
    if failed:
        parts.append(f"Significantly better than the untrained CNN (not a win over a trained one): {', '.join(failed)}.")
    if groups["CNN better"]:
        parts.append(f"Significantly worse than the CNN: {', '.join(groups['CNN better'])}.")
    if groups["no significant difference"]:
        parts.append(f"No significant difference from the CNN: {', '.join(groups['no significant difference'])}.")
    return " ".join(parts) + f" (Exact McNemar test, Holm-adjusted over {len(tests)} heads, α = {ALPHA}.)"


def headline_table(models: dict[str, dict[str, Any]], tests: dict[str, dict[str, Any]],
                   label: dict[str, str] | None = None, baseline: dict[str, Any] | None = None) -> Table:
    colors = plots.model_colors(list(models))
    rows = []
    order = ["cnn", *sorted((n for n in models if n != "cnn"), key=lambda n: -models[n]["accuracy"])]
    for name in order:
        m, t = models[name], tests.get(name)
        rows.append([
            name, _ci(m["accuracy"], m["accuracy_ci"]), _ci(m["macro_f1"], m["macro_f1_ci"]),
            _f(m["balanced_accuracy"]), _f(m["roc_auc"]), _f(m["ece"]),
            "—" if t is None else _ci(t["delta_accuracy"], t["delta_accuracy_ci"], signed=True),
            "—" if t is None else _p(t["mcnemar"]["p_holm"]),
        ])
    if baseline is not None:
        rows.append([f"baseline: {baseline['name']} ('{baseline['class']}')", _f(baseline["accuracy"]),
                     _f(baseline["macro_f1"]), "—", "—", "—", "—", "—"])
    return Table(["model", "accuracy [95% CI]", "macro F1 [95% CI]", "balanced accuracy", "ROC-AUC", "ECE",
                  "Δ accuracy vs CNN [95% CI]", "McNemar p (Holm)"], rows, colors)


def significance_table(tests: dict[str, dict[str, Any]]) -> Table:
    rows = []
    for name, t in tests.items():
        mc, dl = t["mcnemar"], t.get("delong")
        rows.append([
            name, _ci(t["delta_macro_f1"], t["delta_macro_f1_ci"], signed=True),
            f"{mc['cnn_only_right']} / {mc['head_only_right']}", f"{_p(mc['p_value'])} ({_p(mc['p_holm'])})",
            "—" if dl is None else f"{dl['difference']:+.4f}",
            "—" if dl is None else f"{dl['z']:+.2f}, {_p(dl['p_value'])} ({_p(dl['p_holm'])})", t["verdict"],
        ])
    return Table(["head", "Δ macro F1 vs CNN [95% CI]", "only CNN / only head right", "McNemar p (Holm)",
                  "Δ ROC-AUC", "DeLong z, p (Holm)", "verdict on accuracy (α = 0.05)"], rows, plots.model_colors(["cnn", *tests]))


def per_class_table(tables: dict[str, list[dict[str, Any]]]) -> Table:
    rows = [[model if k == 0 else "", r["class"], _f(r["precision"]), _f(r["recall"]), _f(r["f1"]),
             *(str(r[c]) for c in ("support", "tp", "tn", "fp", "fn"))]
            for model, table in tables.items() for k, r in enumerate(table)]
    return Table(["model", "class", "precision", "recall", "F1", "support", "TP", "TN", "FP", "FN"], rows,
                 plots.model_colors(list(tables)), label_columns=2)


def kept_epoch(monitor: str | None) -> str:
    """Which epoch's weights the run kept, as its --monitor chose: what the dotted line marks."""
    if monitor == "none":
        return "the final epoch, kept as --monitor none trains the whole schedule"
    if monitor in ("loss", "macro_f1"):
        return (f"the epoch kept, the latest within one standard error of the best validation "
                f"{'loss' if monitor == 'loss' else 'macro F1'}")
    return "the epoch kept"


def run_document(summary: dict[str, Any], cfg: RunConfig, figures: dict[str, Path],
                 notes: dict[str, str]) -> Doc:
    models, tests, boot = summary["models"], summary["tests"], summary["bootstrap"]
    names = summary["class_names"]
    colors = plots.model_colors(list(models))
    run = summary["run"]
    doc = Doc(f"featurepipe comparison — {run['arch']} features on {Path(run['data']).name}")
    counts = ", ".join(f"{c}: {n}" for c, n in zip(names, summary["class_counts"]))
    doc.para(f"Run {run['path']} · test set {summary['test_size']} images ({counts}) · seed {run['seed']} · "
             f"created {summary['created']}. Every model is scored on the same test images.")

    doc.takeaway(takeaway(models, tests, summary.get("baseline")))
    doc.heading("Results")
    doc.table(headline_table(models, tests, baseline=summary.get("baseline")))
    doc.para(f"95% intervals: percentile bootstrap, {boot['resamples']} resamples stratified by true class "
             f"(seed {boot['seed']}); differences use the same resamples for both models (paired). McNemar: "
             "exact two-sided test on the images exactly one of the two models gets right; p-values adjusted "
             "over all heads with Holm's method. ECE: expected calibration error of the top-label probability, "
             f"{stats.ECE_BINS} equal-width bins.", note=True)
    doc.figure_row([(figures["accuracy"], "Test accuracy per model with 95% bootstrap intervals"),
                    (figures["macro_f1"], "Test macro F1 per model with 95% bootstrap intervals")])

    doc.heading("Is the difference real? Each head against the CNN")
    doc.table(significance_table(tests))
    doc.para("only CNN / only head right: the discordant images McNemar's test uses; Holm's adjustment in "
             "brackets. "
             + ("DeLong: test of the two correlated ROC-AUCs (binary task)." if len(names) == 2
                else "DeLong's test applies to two classes only; this task has more."), note=True)

    doc.heading("All metrics")
    doc.table(Table(
        ["model", "macro precision", "macro recall", "macro F1", "weighted precision", "weighted recall",
         "weighted F1", "log loss", "ECE"],
        [[n, *(_f(m[k]) for k in ("macro_precision", "macro_recall", "macro_f1", "weighted_precision",
                                  "weighted_recall", "weighted_f1", "log_loss", "ece"))] for n, m in models.items()],
        colors))
    doc.heading("As the MedMNIST benchmark reports it", level=3)
    doc.table(Table(["model", "AUC", "ACC"],
                    [[n, _f(m["medmnist_auc"], 3), _f(m["medmnist_acc"], 3)] for n, m in models.items()], colors))
    doc.para("medmnist.evaluator's definitions: binary — AUC of the last class's probability, ACC with that "
             "probability > 0.5; multi-class — mean of one-vs-rest AUCs, ACC of the arg-max. Three decimals, as "
             "in the MedMNIST v2 tables.", note=True)
    doc.heading("Cost", level=3)
    doc.table(Table(["model", "fit time", "prediction ms / image"],
                    [[n, _duration(m["fit_seconds"]), _ms(m["predict_seconds_per_image"])]
                     for n, m in models.items()], colors))
    doc.para("CNN: training time and its forward pass on the test set. Heads: hyperparameter search and fit on "
             "the train embeddings, and predict_proba on the test embeddings — computing an embedding costs "
             "about one CNN forward pass on top.", note=True)

    doc.heading("Per class")
    doc.figure(figures["confusion"], "Confusion matrices, each row normalised over the true class")
    doc.table(per_class_table(summary["per_class"]))
    doc.para("TP, TN, FP, FN: each class against the rest, as scikit-learn's multilabel_confusion_matrix counts "
             "them. Also in per_class.csv.", note=True)

    doc.heading("Calibration and ranking")
    doc.figure(figures["reliability"], "Reliability diagrams: bars below the diagonal mean over-confidence")
    if "roc" in figures:
        doc.figure(figures["roc"], "ROC curves on the test set")

    doc.heading("Where the CNN fails")
    if "images" in notes:
        doc.para(notes["images"], note=True)
    if "top_losses" in figures:
        doc.figure(figures["top_losses"], "The CNN's highest-loss test images")
    if "gradcam" in figures:
        doc.figure(figures["gradcam"], "Grad-CAM on the first of them: where the CNN found evidence for its "
                                       "prediction and for the true class")
    doc.table(Table(
        ["image id", "true", "CNN predicts", "p(pred)", "p(true)", "heads right"],
        [[f["id"], f["true"], f["cnn_pred"], _f(f["cnn_p_pred"], 3), _f(f["cnn_p_true"], 3),
          ", ".join(f["heads_right"]) or "none"] for f in summary["failures"]]))

    doc.heading("Training and configuration")
    if "training_curves" in figures:
        doc.figure(figures["training_curves"], f"The CNN's training curves (dotted: {kept_epoch(cfg.train.monitor)})")
    doc.table(Table(["head", "chosen on validation", "val macro F1"],
                    [[n, ", ".join(f"{k.split('__')[-1]}={v}" for k, v in h["params"].items()) or "—",
                      _f(h["val_macro_f1"])] for n, h in summary["heads"].items()], colors))
    doc.code(json.dumps({k: cfg.sections[k] for k in ("data", "train", "model") if k in cfg.sections}, indent=2),
             "run config (config.json)")
    doc.code(json.dumps(summary["environment"], indent=2), "environment of this comparison")
    return doc


# ------------------------------------------------------------------------------------------ several runs

def compare_runs(runs: list[str | Path], out: str | Path | None, options: CompareOptions | None = None) -> dict[str, Any]:
    """One run: its full report (see `compare`). Several: side by side in one table and chart, in `out`."""
    options = options or CompareOptions()
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
        preds = load_all(cfg)
        if class_names is not None and preds["cnn"].class_names != class_names:
            raise FeaturepipeError(f"--run {run}: its classes ({', '.join(preds['cnn'].class_names)}) differ from "
                                   f"the first run's ({', '.join(class_names)}); compare runs of one task")
        class_names = preds["cnn"].class_names
        test_ids[label] = preds["cnn"].ids
        evaluated = score_run(cfg, preds, options.resamples)
        results[label] = {"path": str(paths.root), "arch": cfg.model.arch, "seed": cfg.seed,
                          "data": cfg.data.source, "test_size": len(preds["cnn"].ids),
                          "models": evaluated["models"], "tests": evaluated["tests"],
                          "baseline": evaluated["baseline"]}
    same = len({tuple(ids) for ids in test_ids.values()}) == 1
    summary = {"class_names": class_names, "same_test_images": same, "runs": results,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": environment()}
    figures = {}
    for metric, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        figures[metric] = out / f"{metric}.png"
        plots.grouped_bars({r: {m: v[metric] for m, v in res["models"].items()} for r, res in results.items()},
                           {r: {m: v[f"{metric}_ci"] for m, v in res["models"].items()} for r, res in results.items()},
                           figures[metric], metric, f"Test {label} per run and model, 95% bootstrap CI")
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


def runs_document(summary: dict[str, Any], figures: dict[str, Path]) -> Doc:
    runs = summary["runs"]
    doc = Doc(f"featurepipe comparison of {len(runs)} runs")
    best_run, best_model = max(((r, m) for r in runs for m in runs[r]["models"]),
                               key=lambda rm: runs[rm[0]]["models"][rm[1]]["accuracy"])
    b = runs[best_run]["models"][best_model]
    doc.takeaway(f"Best test accuracy: {best_model} of {best_run} ({b['accuracy']:.4f}, 95% CI "
                 f"{b['accuracy_ci'][0]:.4f}–{b['accuracy_ci'][1]:.4f}). "
                 + ("All runs are scored on the same test images." if summary["same_test_images"] else
                    "The runs are scored on different test images (another split or data set): differences "
                    "between runs are not paired, so read their intervals, not just the point values."))
    rows = []
    colors = plots.model_colors([m for r in runs.values() for m in r["models"]])
    for label, r in runs.items():
        for k, (name, m) in enumerate(r["models"].items()):
            t = r["tests"].get(name)
            rows.append([label if k == 0 else "", name, _ci(m["accuracy"], m["accuracy_ci"]),
                         _ci(m["macro_f1"], m["macro_f1_ci"]), _f(m["balanced_accuracy"]), _f(m["roc_auc"]),
                         _f(m["ece"]), "—" if t is None else _p(t["mcnemar"]["p_holm"])])
        base = r["baseline"]
        rows.append(["", f"baseline: {base['name']} ('{base['class']}')", _f(base["accuracy"]), _f(base["macro_f1"]),
                     "—", "—", "—", "—"])
    failed = [label for label, r in runs.items() if not r["baseline"]["cnn_above"]]
    if failed:
        doc.para(f"The CNN did not learn in {', '.join(failed)}: its test accuracy is not above the majority-class "
                 "baseline, so its heads' scores are no evidence that heads beat a trained CNN.")
    doc.table(Table(["run", "model", "accuracy [95% CI]", "macro F1 [95% CI]", "balanced accuracy", "ROC-AUC",
                     "ECE", "McNemar p vs its CNN (Holm)"], rows, colors, swatch_column=1, label_columns=2))
    doc.para("Intervals: stratified percentile bootstrap per run. McNemar compares each head with the CNN of "
             "its own run; each run's own report (featurepipe compare --run RUN) has every detail.", note=True)
    doc.figure_row([(figures["accuracy"], "Test accuracy per run and model, 95% bootstrap intervals"),
                    (figures["macro_f1"], "Test macro F1 per run and model, 95% bootstrap intervals")])
    doc.heading("Runs")
    doc.table(Table(["run", "arch", "seed", "test images", "path", "data"],
                    [[k, r["arch"], str(r["seed"]), str(r["test_size"]), r["path"], r["data"]]
                     for k, r in runs.items()]))
    return doc
