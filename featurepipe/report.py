"""The comparison: every model on the same test images, as summary.json, summary.md and charts."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, load_predictions, report, scores
from featurepipe.models import fingerprint
from featurepipe.plots import metric_bars
from featurepipe.progress import log
from featurepipe.runs import RunPaths, environment, load_config, read_json, require, run_paths, write_json, write_text

TABLE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "log_loss")


def fitted_heads(paths: RunPaths) -> list[str]:
    return sorted(p.stem for p in paths.heads.glob("*.joblib")) if paths.heads.exists() else []


def load_all(paths: RunPaths) -> dict[str, Predictions]:
    """The CNN's and every head's test predictions, refused unless all cover the same test ids."""
    cfg = load_config(paths)
    class_names = cfg["data"]["class_names"]
    require(paths.predictions("cnn"), "CNN test predictions", f"run featurepipe train-cnn --out {paths.root} first")
    heads = fitted_heads(paths)
    if not heads:
        raise FeaturepipeError(f"{paths.heads}: no fitted heads; run featurepipe fit-heads --run {paths.root} first")
    current = fingerprint(paths.checkpoint)
    preds = {"cnn": load_predictions(paths.predictions("cnn"), class_names)}
    for name in heads:
        info = read_json(require(paths.head_info(name), "head info", f"re-run featurepipe fit-heads --heads {name}"))
        if info["checkpoint"] != current:
            raise FeaturepipeError(
                f"{paths.head_model(name)}: fitted on features of an older checkpoint; "
                f"re-run featurepipe extract and fit-heads --run {paths.root}"
            )
        preds[name] = load_predictions(paths.predictions(name), class_names)
    reference = preds["cnn"].ids
    for name, p in preds.items():
        if p.ids != reference:
            raise FeaturepipeError(
                f"{paths.predictions(name)}: covers other test images than the CNN's; re-run extract and fit-heads"
            )
    return preds


def compare(run: str | Path) -> dict[str, Any]:
    paths = run_paths(run)
    preds = load_all(paths)
    cfg = load_config(paths)
    first = next(iter(preds.values()))
    summary = {
        "test_size": len(first.ids),
        "class_names": first.class_names,
        "models": {name: scores(p) for name, p in preds.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {"arch": cfg["model"]["arch"], "seed": cfg["train"]["seed"], "data": cfg["data"]["source"]},
        "environment": environment(),
    }
    out = paths.compare
    write_json(out / "summary.json", summary)
    reports = {name: report(p) for name, p in preds.items()}
    write_text(out / "classification_reports.txt",
               "".join(f"== {name} ==\n{text}\n" for name, text in reports.items()))
    write_text(out / "summary.md", summary_markdown(summary, reports))
    metric_bars({n: m["accuracy"] for n, m in summary["models"].items()}, out / "accuracy.png", "accuracy",
                f"Test accuracy, {summary['test_size']} images ({cfg['model']['arch']} features)")
    best = max(summary["models"], key=lambda n: summary["models"][n]["accuracy"])
    log(f"best on test accuracy: {best} ({summary['models'][best]['accuracy']:.4f}) → {out / 'summary.md'}")
    return summary


def summary_markdown(summary: dict[str, Any], reports: dict[str, str]) -> str:
    models = summary["models"]
    cnn = models["cnn"]["accuracy"]
    lines = [
        f"# featurepipe comparison — {summary['run']['arch']} on {summary['run']['data']}",
        "",
        f"Test set: {summary['test_size']} images, classes: {', '.join(summary['class_names'])}.",
        "",
        "| model | " + " | ".join(m.replace("_", " ") for m in TABLE_METRICS) + " | Δ accuracy vs CNN |",
        "|---" * (len(TABLE_METRICS) + 2) + "|",
    ]
    for name, m in sorted(models.items(), key=lambda kv: -kv[1]["accuracy"]):
        delta = "—" if name == "cnn" else f"{m['accuracy'] - cnn:+.4f}"
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in TABLE_METRICS) + f" | {delta} |")
    lines += ["", "![accuracy](accuracy.png)", "", "## Classification reports", ""]
    for name, text in reports.items():
        lines += [f"### {name}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)
