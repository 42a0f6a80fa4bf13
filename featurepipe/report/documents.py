"""The two documents a comparison writes (one run, several runs side by side), as `render.Doc`s that become
summary.md and report.html; the takeaway in words and the tables in them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from featurepipe import plots, stats
from featurepipe.render import Doc, Table
from featurepipe.report.scoring import ALPHA, DECIDERS, UNTRAINED_WIN, best
from featurepipe.run_config import RunConfig


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
             base: dict[str, Any] | None = None, test_note: str | None = None) -> str:
    """The result in words: whether the CNN learned, the best model, and which heads differ from the CNN beyond chance."""
    top = best(models)
    parts = []
    if base is not None and not base["cnn_above"]:
        parts.append(f"No evidence that the CNN learned this task: its test accuracy {models['cnn']['accuracy']:.4f} "
                     f"(95% CI {models['cnn']['accuracy_ci'][0]:.4f}–{models['cnn']['accuracy_ci'][1]:.4f}) is not "
                     f"clearly above the majority-class baseline {base['accuracy']:.4f} (always '{base['class']}'): its "
                     "interval reaches down to it. A head beating it is no evidence that heads beat a trained CNN; "
                     "its features may be those of a failed model.")
    parts.append(f"Best test accuracy: {_with_ci(top['accuracy'], models, 'accuracy')}"
                 + (f"; majority-class baseline {base['accuracy']:.4f}." if base is not None else "."))
    if top["macro_f1"] != top["accuracy"]:
        parts.append(f"Best macro F1 (every class weighed alike): {_with_ci(top['macro_f1'], models, 'macro_f1')}.")
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
    note = test_note or "Exact McNemar test"
    return " ".join(parts) + f" ({note}, Holm-adjusted over {len(tests)} heads, α = {ALPHA}.)"


def _with_ci(name: str, models: dict[str, dict[str, Any]], metric: str) -> str:
    m = models[name]
    return f"{name} ({m[metric]:.4f}, 95% CI {m[metric + '_ci'][0]:.4f}–{m[metric + '_ci'][1]:.4f})"


def headline_table(models: dict[str, dict[str, Any]], tests: dict[str, dict[str, Any]],
                   label: dict[str, str] | None = None, baseline: dict[str, Any] | None = None,
                   decider: str = "mcnemar") -> Table:
    """Every model's scores with intervals, its difference from the CNN and the p of the test that decides."""
    colors = plots.model_colors(list(models))
    rows = []
    order = ["cnn", *sorted((n for n in models if n != "cnn"), key=lambda n: -models[n]["accuracy"])]
    for name in order:
        m, t = models[name], tests.get(name)
        rows.append([
            name, _ci(m["accuracy"], m["accuracy_ci"]), _ci(m["macro_f1"], m["macro_f1_ci"]),
            _f(m["balanced_accuracy"]), _f(m["roc_auc"]), _f(m["ece"]),
            "—" if t is None else _ci(t["delta_accuracy"], t["delta_accuracy_ci"], signed=True),
            "—" if t is None else _p(t[decider]["p_holm"]),
        ])
    if baseline is not None:
        rows.append([f"baseline: {baseline['name']} ('{baseline['class']}')", _f(baseline["accuracy"]),
                     _f(baseline["macro_f1"]), "—", "—", "—", "—", "—"])
    return Table(["model", "accuracy [95% CI]", "macro F1 [95% CI]", "balanced accuracy", "ROC-AUC", "ECE",
                  "Δ accuracy vs CNN [95% CI]", f"{DECIDERS[decider]} p (Holm)"], rows, colors)


def significance_table(tests: dict[str, dict[str, Any]]) -> Table:
    """Each head's paired tests against the CNN, and the verdict with the test that decided it."""
    folds = any("corrected_t" in t for t in tests.values())
    rows = []
    for name, t in tests.items():
        mc, dl, ct = t["mcnemar"], t.get("delong"), t.get("corrected_t")
        rows.append([
            name, _ci(t["delta_macro_f1"], t["delta_macro_f1_ci"], signed=True),
            f"{mc['cnn_only_right']} / {mc['head_only_right']}", f"{_p(mc['p_value'])} ({_p(mc['p_holm'])})",
            *([] if not folds else ["—" if ct is None else f"{ct['t']:+.2f}, {_p(ct['p_value'])} ({_p(ct['p_holm'])})"]),
            "—" if dl is None else f"{dl['difference']:+.4f}",
            "—" if dl is None else f"{dl['z']:+.2f}, {_p(dl['p_value'])} ({_p(dl['p_holm'])})",
            f"{t['verdict']} ({DECIDERS[t.get('decided_by', 'mcnemar')]})",
        ])
    return Table(["head", "Δ macro F1 vs CNN [95% CI]", "only CNN / only head right", "McNemar p (Holm)",
                  *(["corrected t, p (Holm)"] if folds else []),
                  "Δ ROC-AUC", "DeLong z, p (Holm)", f"verdict on accuracy (α = {ALPHA}), by"], rows,
                 plots.model_colors(["cnn", *tests]), wrap_columns=(-1,))


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


def features_table(doc: Doc, summary: dict[str, Any]) -> None:
    """What each row's model was fitted on, in words: the fine-tuned CNN's embedding or the frozen backbone's."""
    doc.heading("What each model sees", level=3)
    doc.table(Table(["model", "input"], [[n, summary["features"][n]] for n in summary["features"]],
                    plots.model_colors(list(summary["features"])), wrap_columns=(-1,)))


def delong_note(names: list[str], tests: dict[str, Any]) -> str:
    """What the DeLong column holds: a binary task's test of the two correlated ROC-AUCs, or why not."""
    if len(names) != 2:
        return "DeLong's test applies to two classes only; this task has more."
    if all("delong" in t for t in tests.values()):
        return "DeLong: test of the two correlated ROC-AUCs (binary task)."
    return f"DeLong's test cannot be computed: it needs {stats.DELONG_MIN} test images of each class."


def metric_sections(doc: Doc, summary: dict[str, Any], figures: dict[str, Path]) -> None:
    """Every metric, MedMNIST's figures, cost, per-class tables and calibration: the part of a report that
    reads the same for one test split and for pooled out-of-fold predictions."""
    models = summary["models"]
    colors = plots.model_colors(list(models))
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


def shift_warning(val_to_test: dict[str, Any]) -> str | None:
    """One line for the report and the console where a model scores lower on test than val predicts."""
    shifted = val_to_test["shifted"]
    if not shifted:
        return None
    m = val_to_test["models"]
    return ("Test is unlike val: " + ", ".join(f"{n} {m[n]['expected']:.3f} expected from val, {m[n]['observed']:.3f} "
                                               "on test" for n in shifted)
            + f" (Holm-adjusted p < {ALPHA}). The test images differ from the val images in more than their class "
            "mix (another site, scanner or period?); heads fitted to the training images' features can lose more "
            "to that than the CNN, so a head that trails here may lead on images like the training ones "
            "(docs/design.md, \"A test set from elsewhere\").")


def val_to_test_section(doc: Doc, val_to_test: dict[str, Any], colors) -> None:
    doc.heading("Does test look like val?")
    if val_to_test.get("one_pool"):
        doc.para("Not checked: featurepipe drew this run's val and test images at random from one pool (its own "
                 "split, or a cross-validation's fold), so they cannot come from another site, scanner or period; "
                 "a model that scores lower on test than on val here shows chance, or the optimism of having "
                 "been chosen on val.")
        return
    m = val_to_test["models"]
    warning = shift_warning(val_to_test)
    small = val_to_test.get("too_small", [])
    doc.para((warning or f"No model scores significantly lower on test than val predicts (Holm-adjusted, "
                         f"α = {ALPHA}).") + (f" For {', '.join(small)}, val and test are too small for any drop to be "
                                             "significant." if small else ""))
    doc.table(Table(["model", "val accuracy", "test accuracy expected from val", "less choosing on val",
                     "test accuracy", "z, p (Holm)"],
                    [[n, f"{_f(c['val_accuracy'])} ({c['val_size']} images)", _f(c["expected"]),
                      _f(c.get("optimism", 0.0)), _f(c["observed"]), f"{c['z']:+.2f}, {_p(c['p_holm'])}"]
                     for n, c in m.items()], colors))
    doc.para("Expected: the model's val recall of each class weighted by test's class shares, so a different class "
             "mix alone is no drop. Less choosing on val: a model chosen as the best of N candidates on val (a "
             "head's grid points, the CNN's epochs with --monitor) scores higher there by chance, by at most the "
             "val score's standard error times √(2 ln N); the drop is tested beyond that, one-sided z-test "
             "against the binomial noise of both splits' recalls."
             + (f" Not shown: {', '.join(skipped)}, whose features come from a fold model that trained on most of "
                "val's images (a --folds run)." if (skipped := val_to_test.get("not_held_out")) else ""), note=True)


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
    if "features" in summary:
        features_table(doc, summary)

    doc.heading("Is the difference real? Each head against the CNN")
    doc.table(significance_table(tests))
    doc.para("only CNN / only head right: the discordant images McNemar's test uses; Holm's adjustment in "
             "brackets. " + delong_note(names, tests), note=True)

    if summary["val_to_test"]["models"] or summary["val_to_test"].get("one_pool"):
        val_to_test_section(doc, summary["val_to_test"], colors)

    metric_sections(doc, summary, figures)

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
        doc.para(f"No evidence that the CNN learned in {', '.join(failed)}: its test accuracy's 95% interval reaches "
                 "down to the majority-class baseline, so its heads' scores are no evidence that heads beat a trained "
                 "CNN.")
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
