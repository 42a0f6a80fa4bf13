"""torchrun with 2 CPU processes (Gloo): the same commands, PyTorch's own DistributedDataParallel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "featurepipe", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_process_training_writes_one_complete_run(npz_file, tmp_path):
    torchrun("train-cnn", "--data", str(npz_file), "--out", "run", "--epochs", "2", cwd=tmp_path)
    run = tmp_path / "run"
    metrics = json.loads((run / "cnn" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and 0 <= metrics["test"]["accuracy"] <= 1
    assert len((run / "cnn" / "history.csv").read_text().splitlines()) == 1 + 2  # rank 0 alone wrote it
    assert not list(run.rglob("*.tmp"))
    torch.load(run / "cnn" / "model.pt", weights_only=True)  # a complete checkpoint
