"""The comparison: every model on the same test images, with the uncertainty a publication needs.

One run: `compare(RUN)` writes RUN/compare/ — summary.json (every figure), summary.md and a
self-contained report.html, metrics.csv, per_class.csv and the charts. Several runs:
`compare_runs([A, B], OUT)` puts them side by side in OUT/.

Where each job is: inputs (what is read from the run), scoring (the statistics), figures, gallery (the
highest-loss images and Grad-CAM), csv_files, documents (summary.md and report.html), command (compare itself).
"""

from featurepipe.report.command import MIN_RESAMPLES, CompareOptions, compare, compare_runs
from featurepipe.report.documents import kept_epoch, run_document, runs_document, takeaway
from featurepipe.report.inputs import load_all, model_cost
from featurepipe.report.scoring import ALPHA, LEVEL, UNTRAINED_WIN, baseline, evaluate_models, score_run

__all__ = [
    "ALPHA", "LEVEL", "MIN_RESAMPLES", "UNTRAINED_WIN", "CompareOptions", "baseline", "compare", "compare_runs",
    "evaluate_models", "kept_epoch", "load_all", "model_cost", "run_document", "runs_document", "score_run", "takeaway",
]
