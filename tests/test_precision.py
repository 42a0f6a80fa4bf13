"""Mixed precision is a choice with a default that suits the device: on CUDA only, unless asked."""

import shutil

import h5py
import numpy as np
import torch

from featurepipe.device import autocast, images_per_pass, in_passes
from featurepipe.models import create_model

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
    cli("extract", "--run", run, "--amp", "--device", "cpu")
    with h5py.File(run / "features.h5") as bf16, h5py.File(tiny_run / "features.h5") as fp32:
        for split in ("train", "val", "test"):
            a, b = bf16[split]["features"][:], fp32[split]["features"][:]
            assert not np.array_equal(a, b)  # bf16 did run
            scale = np.abs(b).max()
            np.testing.assert_allclose(a, b, atol=0.05 * scale)  # bf16 keeps ~3 significant digits


def test_cpu_inference_runs_in_passes_sized_to_the_activations_and_gives_the_same_features():
    torch.manual_seed(0)
    net = create_model("sixblock", 2, 1, [0.5], [0.25]).eval()
    small, large = images_per_pass(net, 28), images_per_pass(net, 224)
    # 64 times the pixels: about 64 times fewer images per pass, and never none.
    assert small is not None and 1 <= large < small
    assert 32 <= small // large <= 128
    x = torch.randint(0, 256, (3 * large + 1, 1, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        np.testing.assert_allclose(in_passes(net.embed, x, large).numpy(), net.embed(x).numpy(), rtol=1e-5, atol=1e-6)
