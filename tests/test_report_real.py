"""The report on real PneumoniaMNIST predictions agrees with scikit-learn recomputed from the saved files.

Trains a one-epoch run (skipped, with a message, where ../shared/data/pneumoniamnist.npz is absent), or
checks an existing run instead: FEATUREPIPE_REPORT_RUN=artifacts/pneu pytest tests/test_report_real.py
"""

import json
import os
from pathlib import Path

import pytest
from scipy.stats import norm

from conftest import REAL_DATA, assert_report_matches_sklearn, cli

EXISTING = os.environ.get("FEATUREPIPE_REPORT_RUN")

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not EXISTING and not REAL_DATA.exists(), reason=f"real data not found at {REAL_DATA}"),
]


def test_pneumoniamnist_report_agrees_with_sklearn(request, tmp_path):
    if EXISTING:
        run = Path(EXISTING)
        out = tmp_path / "compare"
        cli("compare", "--run", run, "--out", out)
    else:
        run = request.getfixturevalue("real_run")
        out = run / "compare"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_size"] == 624 and summary["class_names"] == ["0", "1"]
    assert_report_matches_sklearn(run, out)
    for head, t in summary["tests"].items():
        # The two-sided p of DeLong's z, and Holm's adjustment never below it.
        assert t["delong"]["p_value"] == pytest.approx(2 * norm.sf(abs(t["delong"]["z"]))), head
        assert t["delong"]["p_holm"] >= t["delong"]["p_value"], head
    assert (out / "gradcam.png").is_file() and (out / "top_losses.png").is_file()
