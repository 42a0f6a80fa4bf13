"""`compare` of a cross-validation (featurepipe crossval): every model's out-of-fold predictions pooled.

Every image is tested once, by the models of the fold that held it out, so the pooled predictions
cover all N images: the table, the bootstrap intervals (over N), McNemar on the pooled pairs, the
per-class tables and charts are those of a single run's report, on N instead of 15 % of N.

Pooling treats k models as one, so McNemar answers "did these fitted models differ on these images?"
and not "would the head beat the CNN if both were trained again on another sample?". The fold-level
test answers that: the corrected resampled t-test of Nadeau and Bengio (2003) on the k per-fold
accuracy differences, whose variance term (1/k + n_test/n_train) accounts for the folds' training
sets overlapping. It decides the verdict; McNemar stays in the table beside it.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe import stats
from featurepipe.data.load import skipped_ids
from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, report, scores
from featurepipe.files import read_json, require, write_json, write_text
from featurepipe.progress import log
from featurepipe.render import Doc, Table
from featurepipe.report.csv_files import metrics_csv, per_class_csv
from featurepipe.report.documents import (delong_note, features_table, headline_table, metric_sections,
                                          significance_table, takeaway)
from featurepipe.report.figures import run_figures
from featurepipe.report.inputs import features_of, load_all, model_cost
from featurepipe.report.scoring import baseline, best_words, evaluate_models, verdict
from featurepipe.run_config import RunConfig
from featurepipe.runs import CrossvalPaths, RunPaths, crossval_command, environment, read_plan

T_TEST = "corrected resampled t-test over the folds (Nadeau and Bengio 2003)"


def fold_runs(root: Path) -> tuple[list[RunPaths], list[set[str]]]:
    """The folds' runs of the cross-validation in `root` and the ids each tested, refused unless every
    one is finished and is the plan's fold."""
    paths = CrossvalPaths(Path(root))
    plan = read_plan(paths.root)
    runs = [paths.fold(k) for k in range(1, len(plan["test_ids"]) + 1)]
    tested = [check_fold(paths, k, plan) for k, r in enumerate(runs, start=1) if r.config.exists()]
    unfinished = [r.root.name for r in runs if not fold_done(r)]
    if unfinished:
        raise FeaturepipeError(f"{paths.root}: {', '.join(unfinished)} not finished; continue with "
                               f"{crossval_command(paths.root)}")
    return runs, tested


def fold_done(run: RunPaths) -> bool:
    """A fold's last stage, its own report, is written."""
    return (run.compare / "summary.json").exists()


def check_fold(paths: CrossvalPaths, k: int, plan: dict[str, Any]) -> set[str]:
    """The ids fold k's run tested, refused unless the run is the plan's fold k: trained on the plan's data
    with the plan's options, testing exactly the plan's images of fold k (less those it could not read).
    Anything else in a fold's folder (a run trained there by hand, copied in, of other data) would be
    pooled as if it were the plan's."""
    run = paths.fold(k)
    config = read_json(require(run.config, "run config", f"delete {run.root} and train it again with {crossval_command(paths.root)}"))
    planned = set(plan["test_ids"][k - 1])
    tested = set(read_json(run.splits).get("test", [])) if run.splits.is_file() else set()
    unread = skipped_ids(run.skipped, "test")
    data, train = config.get("data", {}), config.get("train", {})
    mine = {key: value for key, value in plan["data"].items() if key in ("index_fingerprint", "class_names")}
    problem = (
        "it is no run of featurepipe's" if config.get("command") != "train-cnn" else
        "it was trained on other data" if any(data.get(key) != value for key, value in mine.items()) else
        "it was trained with other options" if any(train.get(key) != value for key, value in plan["train"].items()
                                                   if key != "folds") else
        "it tests other images" if tested - planned or planned - tested - unread else None)
    if problem is not None:
        raise FeaturepipeError(f"{run.root}: not fold {k} of the cross-validation planned in {paths.plan} ({problem}); "
                               f"delete {run.root} and train it again with {crossval_command(paths.root)}")
    return tested


def pool(per_fold: list[dict[str, Predictions]], where: Path) -> dict[str, Predictions]:
    """Each model's test predictions of every fold, one after the other; refused unless every fold has the
    same models and no image is tested twice."""
    names = list(per_fold[0])
    for k, preds in enumerate(per_fold, start=1):
        if set(preds) != set(names):
            raise FeaturepipeError(f"{where}/fold{k}: its models ({', '.join(preds)}) differ from fold1's "
                                   f"({', '.join(names)}); finish every fold with {crossval_command(where)}")
    pooled = {}
    for name in names:
        parts = [preds[name] for preds in per_fold]
        pooled[name] = Predictions([i for p in parts for i in p.ids], np.concatenate([p.y_true for p in parts]),
                                   np.concatenate([p.proba for p in parts]), parts[0].class_names)
    ids = pooled["cnn"].ids
    if len(set(ids)) != len(ids):
        raise FeaturepipeError(f"{where}: an image is tested in more than one fold; the folds are damaged, "
                               "run the cross-validation again in a new folder")
    return pooled


def fold_table(per_fold: list[dict[str, Predictions]], cfgs: list[RunConfig]) -> list[dict[str, Any]]:
    """Each fold's sizes and every model's accuracy and macro F1 on the fold's own test images."""
    rows = []
    for k, (preds, cfg) in enumerate(zip(per_fold, cfgs), start=1):
        counts = cfg.data.counts
        n_test = len(preds["cnn"].ids)
        # What the fold's models learned from: every readable image it did not test (train, and val for choices).
        n_train = sum(sum(counts.get(s, [])) for s in ("train", "val"))
        rows.append({"fold": k, "n_test": n_test, "n_train": n_train,
                     "models": {n: {m: scores(p)[m] for m in ("accuracy", "macro_f1")} for n, p in preds.items()}})
    return rows


def corrected_tests(folds: list[dict[str, Any]], tests: dict[str, dict[str, Any]]) -> None:
    """Adds each head's corrected resampled t-test on the per-fold accuracy differences, Holm-adjusted
    over the heads, and makes it the test that decides the verdict."""
    n_train = float(np.mean([f["n_train"] for f in folds]))
    n_test = float(np.mean([f["n_test"] for f in folds]))
    for name, t in tests.items():
        d = [f["models"][name]["accuracy"] - f["models"]["cnn"]["accuracy"] for f in folds]
        c = stats.corrected_resampled_ttest(np.array(d), n_train, n_test)
        t["corrected_t"] = {"differences": d, "mean": c.mean, "se": c.se, "t": c.t, "df": c.df,
                            "p_value": c.p_value, "n_train": n_train, "n_test": n_test}
    names = list(tests)
    for name, adjusted in zip(names, stats.holm([tests[n]["corrected_t"]["p_value"] for n in names]) if names else []):
        tests[name]["corrected_t"]["p_holm"] = adjusted


def compare_crossval(root: str | Path, out: str | Path | None, options) -> dict[str, Any]:
    """The pooled report of the cross-validation in `root`, written to `out` (default ROOT/compare)."""
    options.validate()
    started = time.perf_counter()
    paths = CrossvalPaths(Path(root))
    plan = read_plan(paths.root)
    runs, tested = fold_runs(paths.root)
    cfgs = [RunConfig.load(r) for r in runs]
    inputs = [load_all(c) for c in cfgs]
    per_fold = [i.preds for i in inputs]
    for run, p, ids in zip(runs, per_fold, tested):
        if set(p["cnn"].ids) != ids:
            raise FeaturepipeError(f"{run.predictions('cnn')}: not the predictions of the images the fold tested; "
                                   f"delete {run.root} and train it again with {crossval_command(paths.root)}")
    preds = pool(per_fold, paths.root)
    out = Path(out) if out is not None else paths.compare
    ref = preds["cnn"]
    seed = plan["seed"]
    evaluated = evaluate_models(preds, options.resamples, seed)
    for name, m in evaluated["models"].items():
        costs = [model_cost(name, i.records[name]) for i in inputs]
        for key in ("fit_seconds", "predict_seconds_per_image"):
            values = [c[key] for c in costs if c[key] is not None]
            m[key] = float(np.mean(values)) if values else None  # per fold: what one fit costs
    train_counts = np.sum([c.data.counts.get("train", [0] * len(ref.class_names)) for c in cfgs], axis=0)
    evaluated["baseline"] = baseline(train_counts.tolist(), ref, evaluated["models"]["cnn"])
    folds = fold_table(per_fold, cfgs)
    tests = evaluated["tests"]
    corrected_tests(folds, tests)
    for t in tests.values():
        t["decided_by"] = "corrected_t"
        t["verdict"] = verdict(t, cnn_learned=evaluated["baseline"]["cnn_above"])
    first = cfgs[0]
    summary = {
        "test_size": len(ref.ids), "pooled": True, "folds": len(runs),
        "class_names": ref.class_names,
        "class_counts": np.bincount(ref.y_true, minlength=len(ref.class_names)).tolist(),
        **evaluated,
        "per_fold": folds,
        "fold_summary": {n: {m: {"mean": float(np.mean([f["models"][n][m] for f in folds])),
                                 "sd": float(np.std([f["models"][n][m] for f in folds], ddof=1))}
                             for m in ("accuracy", "macro_f1")} for n in preds},
        "features": {n: features_of(n, first, inputs[0].records[n]) for n in preds},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {"path": str(paths.root), "arch": first.model.arch, "seed": seed, "data": plan["data"]["source"],
                "img_size": first.model.img_size, "folds": [str(r.root) for r in runs]},
        "environment": environment(),
    }
    figures = run_figures(RunPaths(paths.root), preds, summary, out)  # no training curves: one per fold
    summary["figures"] = {k: v.name for k, v in figures.items()}
    write_text(out / "per_class.csv", per_class_csv(summary["per_class"]))
    write_text(out / "metrics.csv", metrics_csv(summary["models"]))
    write_text(out / "classification_reports.txt",
               "".join(f"== {name} ==\n{report(p)}\n" for name, p in preds.items()))
    doc = pooled_document(summary, plan, figures)
    write_text(out / "summary.md", doc.markdown(out))
    write_text(out / "report.html", doc.html())
    summary["timing"] = {"compare_seconds": round(time.perf_counter() - started, 2)}
    write_json(out / "summary.json", summary)
    log(f"pooled over {len(ref.ids)} images in {len(runs)} folds: best accuracy {best_words(summary['models'])} "
        f"→ {out / 'report.html'}")
    return summary


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def pooled_document(summary: dict[str, Any], plan: dict[str, Any], figures: dict[str, Path]) -> Doc:
    models, tests, boot, folds = summary["models"], summary["tests"], summary["bootstrap"], summary["per_fold"]
    names = summary["class_names"]
    run = summary["run"]
    k = summary["folds"]
    doc = Doc(f"featurepipe cross-validation — {run['arch']} features on {Path(run['data']).name}, {k} folds")
    counts = ", ".join(f"{c}: {n}" for c, n in zip(names, summary["class_counts"]))
    doc.para(f"Cross-validation {run['path']} · {summary['test_size']} images ({counts}), each tested once, by the "
             f"models of the fold that held it out · {k} folds stratified by class, seed {run['seed']} · created "
             f"{summary['created']}. Each fold is an ordinary run (fold1/ … fold{k}/) with its own report.")
    doc.takeaway(takeaway(models, tests, summary.get("baseline"), test_note="C" + T_TEST[1:]))
    doc.heading("Results, pooled over every image")
    doc.table(headline_table(models, tests, baseline=summary.get("baseline"), decider="corrected_t"))
    doc.para(f"Out-of-fold predictions of all {k} folds pooled: {summary['test_size']} images. 95% intervals: "
             f"percentile bootstrap over the pooled images, {boot['resamples']} resamples stratified by true class "
             f"(seed {boot['seed']}), paired for differences. The p-value is the {T_TEST}, on the {k} per-fold "
             "accuracy differences with variance (1/k + n_test/n_train)·s² and k − 1 degrees of freedom, "
             "Holm-adjusted over the heads: it decides the verdict. McNemar on the pooled pairs is below.",
             note=True)
    doc.figure_row([(figures["accuracy"], "Pooled accuracy per model with 95% bootstrap intervals"),
                    (figures["macro_f1"], "Pooled macro F1 per model with 95% bootstrap intervals")])
    features_table(doc, summary)

    doc.heading("Per fold")
    rows = []
    for n in models:
        acc = [f["models"][n]["accuracy"] for f in folds]
        rows.append([n, *(f"{a:.4f}" for a in acc), _mean_sd(acc),
                     _mean_sd([f["models"][n]["macro_f1"] for f in folds])])
    doc.table(Table(["model", *(f"fold {f['fold']}" for f in folds), "accuracy mean ± sd", "macro F1 mean ± sd"],
                    rows))
    doc.para("Accuracy on each fold's own test images; test images per fold: "
             + ", ".join(str(f["n_test"]) for f in folds) + "; images each fold learned from (train + val): "
             + ", ".join(str(f["n_train"]) for f in folds) + ". sd: sample standard deviation over the folds.",
             note=True)

    doc.heading("Is the difference real? Each head against the CNN")
    doc.table(significance_table(tests))
    doc.para("only CNN / only head right: discordant pooled images, for McNemar's exact test; corrected t: "
             f"{T_TEST}, t with k − 1 = {k - 1} degrees of freedom; Holm's adjustment in brackets. "
             + delong_note(names, tests), note=True)
    metric_sections(doc, summary, figures)
    doc.heading("Configuration")
    doc.para("Failures, Grad-CAM and training curves are in each fold's own report (featurepipe compare --run "
             "DIR/foldK, which adds Grad-CAM).", note=True)
    doc.code(json.dumps({k: plan[k] for k in ("data", "crossval", "train", "seed") if k in plan}, indent=2),
             "cross-validation plan (crossval.json)")
    doc.code(json.dumps(summary["environment"], indent=2), "environment of this comparison")
    return doc
