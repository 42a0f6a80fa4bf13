"""On the real PneumoniaMNIST split (../shared/data); skipped where that file is absent."""

import json

import h5py
import pytest

from conftest import REAL_DATA

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not REAL_DATA.exists(), reason=f"real data not found at {REAL_DATA}"),
]


def test_pneumoniamnist_pipeline(real_run):
    with h5py.File(real_run / "features.h5") as h5:
        assert {s: h5[s]["features"].shape[0] for s in ("train", "val", "test")} == \
            {"train": 4708, "val": 524, "test": 624}
    summary = json.loads((real_run / "compare" / "summary.json").read_text())
    assert summary["test_size"] == 624 and summary["class_names"] == ["0", "1"]
    # 62.5 % of the test set is pneumonia: a model that learned nothing scores about 0.63.
    for name, m in summary["models"].items():
        assert m["accuracy"] >= 0.8, (name, m)
        assert m["macro_f1"] >= 0.75, (name, m)
