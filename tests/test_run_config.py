"""RunConfig: config.json typed and read once, old runs included, and the checks every later command makes."""

import dataclasses
import json

import numpy as np
import pytest

from featurepipe.errors import FeaturepipeError
from featurepipe.evaluate import Predictions, macro_f1, scores
from featurepipe.models import fingerprint
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths


def old_run(root, **extra):
    """A run as an early featurepipe left it: no data source, counts, monitor or model section."""
    (root / "cnn").mkdir(parents=True)
    (root / "cnn" / "model.pt").write_bytes(b"weights")
    (root / "cnn" / "metrics.json").write_text("{}")
    (root / "config.json").write_text(json.dumps({"data": {"class_names": ["a", "b"]}, "train": {"seed": 3}, **extra}))
    return run_paths(root)


def test_an_old_run_loads_with_defaults_and_is_frozen(tmp_path):
    cfg = RunConfig.load(old_run(tmp_path / "run"))
    assert (cfg.class_names, cfg.seed, cfg.data.source, cfg.data.counts, cfg.train.monitor, cfg.model) == \
        (["a", "b"], 3, None, {}, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None


def test_a_current_run_is_typed(tmp_path):
    model = {"arch": "sixblock", "num_classes": 2, "in_channels": 1, "img_size": 28, "mean": [0.5], "std": [0.2]}
    cfg = RunConfig.load(old_run(tmp_path / "run", model=model))
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.in_channels) == ("sixblock", 28, 1)
    assert cfg.sections["model"] == model  # as read, for the report's listing


def test_an_unfinished_run_is_refused(tmp_path):
    paths = old_run(tmp_path / "run")
    paths.cnn_metrics.unlink()
    with pytest.raises(FeaturepipeError, match="did not finish"):
        RunConfig.load(paths)


def test_fitted_heads_and_the_stale_checkpoint_check(tmp_path):
    paths = old_run(tmp_path / "run")
    cfg = RunConfig.load(paths)
    assert cfg.fitted_heads() == []
    paths.heads.mkdir()
    for name, checkpoint in (("svm", fingerprint(paths.checkpoint)), ("rf", "0" * 16)):
        paths.head_model(name).write_bytes(b"")
        paths.head_info(name).write_text(json.dumps({"checkpoint": checkpoint}))
    assert cfg.fitted_heads() == ["rf", "svm"]
    assert cfg.head_info("svm")["checkpoint"] == cfg.checkpoint
    with pytest.raises(FeaturepipeError, match="older checkpoint"):
        cfg.head_info("rf")


def test_one_macro_f1_for_every_caller():
    rng = np.random.default_rng(0)
    y, yhat = rng.integers(0, 3, 50), rng.integers(0, 2, 50)  # class 2 never predicted
    proba = np.eye(3)[yhat]
    assert scores(Predictions([str(i) for i in range(50)], y, proba, ["a", "b", "c"]))["macro_f1"] == macro_f1(y, yhat, 3)
    # Over the run's classes, a class missing from both counts as 0; over the labels seen, it does not count.
    assert macro_f1(np.array([0, 1]), np.array([0, 1]), 3) == pytest.approx(2 / 3)
    assert macro_f1(np.array([0, 1]), np.array([0, 1])) == 1.0
