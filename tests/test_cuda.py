"""The CUDA path: AMP, pinned memory, non-blocking copies, channels_last. Runs where a GPU is (CI has none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurepipe.features import read_split
from featurepipe.predict import predict

from conftest import cli, write_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_run_trained_on_the_gpu_embeds_and_predicts_as_on_the_cpu(npz_file, tmp_path):
    run = tmp_path / "run"
    cli("train-cnn", "--data", npz_file, "--out", run, "--epochs", "3", "--device", "cuda")
    cli("extract", "--run", run, "--device", "cpu")
    cpu = {s: read_split(run / "features.h5", s) for s in ("train", "test")}
    cli("extract", "--run", run, "--device", "cuda", "--no-amp")
    fp32 = {s: read_split(run / "features.h5", s) for s in ("train", "test")}
    cli("extract", "--run", run, "--device", "cuda")  # bf16 autocast, the default
    amp = {s: read_split(run / "features.h5", s) for s in ("train", "test")}
    for s in cpu:
        assert fp32[s].ids == amp[s].ids == cpu[s].ids
        assert relative_error(fp32[s].features, cpu[s].features) < 5e-3  # TF32 convolutions
        assert relative_error(amp[s].features, cpu[s].features) < 3e-2  # bf16 has 8 bits of mantissa
    cli("fit-heads", "--run", run, "--heads", "logreg")
    cli("compare", "--run", run)
    assert (run / "compare" / "accuracy.png").exists()

    images = tmp_path / "new"
    write_images(images, 4, size=40, seed=3)
    for model in ("cnn", "logreg"):
        _, on_gpu, _ = predict(run, model, [str(images)], out=tmp_path / "gpu.csv", device="cuda")
        _, on_cpu, _ = predict(run, model, [str(images)], out=tmp_path / "cpu.csv", device="cpu")
        assert np.abs(on_gpu - on_cpu).max() < 0.05, model


def test_resnet_fine_tunes_on_the_gpu_with_a_frozen_phase(train_test_folders, tmp_path):
    run = tmp_path / "r18"
    cli("train-cnn", "--data", train_test_folders, "--out", run, "--arch", "resnet18", "--img-size", "64",
        "--epochs", "3", "--freeze-epochs", "1", "--ema", "--device", "cuda")
    cli("extract", "--run", run, "--tta", "flip")
    features = read_split(run / "features.h5", "test").features
    assert np.isfinite(features).all() and features.shape[1] == 512


def test_more_processes_than_gpus_is_refused_in_one_line(npz_file, tmp_path):
    n = torch.cuda.device_count() + 1
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                             "-m", "featurepipe", "train-cnn", "--data", npz_file, "--out", "run", "--epochs", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert f"{n} processes per node but this machine has {n - 1} GPU" in result.stderr
    assert not (tmp_path / "run" / "cnn" / "model.pt").exists()


# ---- issue 16: feeding the GPU (data/gpu.py, data/cache.py) ------------------------------------------------

def test_batches_sliced_on_the_gpu_are_the_loaders():
    import test_gpu_feed as feed

    cuda = torch.device("cuda")
    for drop_last in (False, True):
        feed.test_device_batches_are_the_loaders_over_epochs(drop_last, 3, device=cuda)
    feed.test_device_batches_follow_a_sampler_and_given_batches(device=cuda)
    loader = feed.fdata.make_loader(feed.memory_dataset(), 8)
    sliced = feed.gpu.on_device(loader, cuda)
    assert isinstance(sliced, feed.gpu.DeviceLoader) and sliced.images.device.type == "cuda"
    x, y, *_ = next(iter(sliced))
    assert x.device.type == y.device.type == "cuda"


@pytest.mark.parametrize("size,channels", [(224, 3), (64, 1)])
def test_nvjpeg_routes_and_matches_the_cpu_decoder(tmp_path, size, channels):
    import test_gpu_feed as feed

    # nvJPEG's IDCT and chroma upsampling are not libjpeg's: a looser bound than on the CPU.
    feed.test_device_decoding_routes_and_matches_the_cpu_decoder(tmp_path, size, channels, device=torch.device("cuda"),
                                                                 tolerance=(1.5, 12))


def test_a_jpeg_folder_extracts_on_the_gpu_as_on_the_cpu(train_test_folders, tmp_path):
    run = tmp_path / "run"
    cli("train-cnn", "--data", train_test_folders, "--out", run, "--epochs", "2", "--img-size", "32", "--device", "cuda")
    cli("extract", "--run", run, "--device", "cpu")
    cpu = {s: read_split(run / "features.h5", s) for s in ("train", "test")}
    cli("extract", "--run", run, "--device", "cuda", "--no-amp")  # the JPEGs decoded by nvJPEG
    gpu = {s: read_split(run / "features.h5", s) for s in ("train", "test")}
    for s in cpu:
        assert gpu[s].ids == cpu[s].ids
        assert relative_error(gpu[s].features, cpu[s].features) < 3e-2  # TF32, and nvJPEG's pixels within 1-2 levels
