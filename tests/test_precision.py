"""Mixed precision is a choice with a default that suits the device: on CUDA only, unless asked."""

import shutil

import h5py
import numpy as np
import torch

from featurepipe.device import autocast

from conftest import cli


def test_autocast_default_is_fp32_on_the_cpu_and_amp_asks_for_bf16():
    cpu, x = torch.device("cpu"), torch.randn(4, 8)
    layer = torch.nn.Linear(8, 2)
    with autocast(cpu):
        assert layer(x).dtype == torch.float32
    with autocast(cpu, True):
        assert layer(x).dtype == torch.bfloat16
    with autocast(cpu, False):
        assert layer(x).dtype == torch.float32


def test_extract_with_amp_on_the_cpu_gives_bf16_close_features(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cli("extract", "--run", run, "--amp")
    with h5py.File(run / "features.h5") as bf16, h5py.File(tiny_run / "features.h5") as fp32:
        for split in ("train", "val", "test"):
            a, b = bf16[split]["features"][:], fp32[split]["features"][:]
            assert not np.array_equal(a, b)  # bf16 did run
            scale = np.abs(b).max()
            np.testing.assert_allclose(a, b, atol=0.05 * scale)  # bf16 keeps ~3 significant digits
