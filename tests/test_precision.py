"""Mixed precision is a choice with a default that suits the processor: autocast on CUDA; on a CPU, bf16
only where it computes bf16 natively, and for the training step only where that is faster; fp32 elsewhere."""

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from featurepipe import device
from featurepipe.device import NATIVE_BF16_VARIABLE, autocast, choose_precision, images_per_pass, in_passes, native_bf16
from featurepipe.engine import Callback
from featurepipe.errors import FeaturepipeError
from featurepipe.models import ARCHS, create_model
from featurepipe.options import TrainConfig
from featurepipe.predict import Predictor
from featurepipe.runs import run_paths
from featurepipe.train import train

from conftest import cli

CPU = torch.device("cpu")


def test_autocast_follows_the_choice_for_a_forward_pass(monkeypatch):
    x, layer = torch.randn(4, 8), torch.nn.Linear(8, 2)
    for native, default in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv(NATIVE_BF16_VARIABLE, native)
        with autocast(CPU):
            assert layer(x).dtype == default
        with autocast(CPU, True):
            assert layer(x).dtype == torch.bfloat16
        with autocast(CPU, False):
            assert layer(x).dtype == torch.float32


def test_native_bf16_is_read_from_the_processors_capabilities(monkeypatch):
    monkeypatch.delenv(NATIVE_BF16_VARIABLE)
    for caps, found in (({"avx2": True, "avx512_f": True}, None), ({"avx512_bf16": True}, "AVX512-BF16"),
                        ({"amx_bf16": True, "avx512_bf16": True}, "AMX and AVX512-BF16")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert native_bf16() == found
    monkeypatch.setenv(NATIVE_BF16_VARIABLE, "yes")
    with pytest.raises(FeaturepipeError, match=f"{NATIVE_BF16_VARIABLE}=yes: give 0"):
        native_bf16()


@pytest.mark.parametrize("native, arch, forward, step", [
    (None, "sixblock", False, False),
    (None, "resnet18", False, False),
    ("AMX", "sixblock", True, True),  # its step measured 1.52x faster
    ("AMX", "resnet18", True, True),
    ("AMX", "efficientnet_lite0", True, False),  # 0.96x: depthwise convolutions' backward
    ("AMX", "resnet50", True, False),  # not measured
    ("AMX", None, True, False),  # extract, predict: no training step
])
def test_auto_precision_on_the_cpu(monkeypatch, native, arch, forward, step):
    monkeypatch.setattr(device, "native_bf16", lambda: native)
    chosen = choose_precision(CPU, None, arch)
    assert (chosen.forward, chosen.train_step) == (forward, step)
    assert ("natively" in chosen.reason) == (native is not None)
    assert choose_precision(CPU, True, arch) == device.Precision(True, True, "--amp")
    assert choose_precision(CPU, False, arch) == device.Precision(False, False, "--no-amp")
    gpu = choose_precision(torch.device("cuda"), None, arch)
    assert (gpu.forward, gpu.train_step) == (True, True)


class DtypeSpy(Callback):
    """Records (gradients on, dtype of the feature extractor's output) of every pass through the model."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, torch.dtype]] = set()

    def on_fit_start(self, trainer) -> None:
        for net in {trainer.net, trainer.evaluated}:  # the trained module and its moving average
            net.features.register_forward_hook(lambda m, i, out: self.seen.add((torch.is_grad_enabled(), out.dtype)))


@pytest.mark.parametrize("native, step_speedup, forward, step", [
    ("0", 1.52, "fp32", "fp32"),
    ("1", 1.52, "bf16", "bf16"),
    ("1", 0.9, "bf16", "fp32"),
])
def test_train_cnn_runs_records_and_logs_the_precision_it_chose(npz_file, tmp_path, monkeypatch, capsys, native,
                                                                  step_speedup, forward, step):
    monkeypatch.setenv(NATIVE_BF16_VARIABLE, native)
    monkeypatch.setitem(ARCHS, "sixblock", dataclasses.replace(ARCHS["sixblock"], cpu_bf16_step=step_speedup))
    spy = DtypeSpy()
    train(str(npz_file), tmp_path / "run", TrainConfig(arch="sixblock", epochs=1, batch_size=16, device="cpu"),
          callbacks=[spy])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # Training steps run with gradients; validation, BatchNorm's recalibration and the evaluation without.
    assert spy.seen == {(True, dtype[step]), (False, dtype[forward])}
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["resolved"]["precision"]
    assert (recorded["forward"], recorded["train_step"]) == (forward, step)
    assert ("natively" in recorded["reason"]) == (native == "1")
    logged = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert f"precision: forward passes {forward}, training step {step} ({recorded['reason']})" in logged


@pytest.mark.parametrize("native, flags", [("1", ()), ("0", ("--amp",))])
def test_extract_in_bf16_gives_features_close_to_fp32(tiny_run, tmp_path, monkeypatch, native, flags):
    monkeypatch.setenv(NATIVE_BF16_VARIABLE, native)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    r = cli("extract", "--run", run, *flags, "--device", "cpu")
    assert "precision: bf16" in r.output
    with h5py.File(run / "features.h5") as bf16, h5py.File(tiny_run / "features.h5") as fp32:
        assert (bf16.attrs["precision"], fp32.attrs["precision"]) == ("bf16", "fp32")
        for split in ("train", "val", "test"):
            a, b = bf16[split]["features"][:], fp32[split]["features"][:]
            assert np.isfinite(a).all() and not np.array_equal(a, b)  # bf16 did run
            np.testing.assert_allclose(a, b, atol=0.05 * np.abs(b).max())  # bf16 keeps ~3 significant digits


def test_no_amp_keeps_fp32_on_a_cpu_with_native_bf16(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_VARIABLE, "1")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    cli("extract", "--run", run, "--no-amp", "--batch-size", "16", "--device", "cpu")
    with h5py.File(run / "features.h5") as again, h5py.File(tiny_run / "features.h5") as fp32:
        assert again.attrs["precision"] == "fp32"
        np.testing.assert_array_equal(again["test"]["features"][:], fp32["test"]["features"][:])
    assert Predictor(run_paths(run), "cnn", CPU, amp=False).precision.forward is False
    assert Predictor(run_paths(run), "cnn", CPU).precision.forward is True


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
