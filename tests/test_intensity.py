"""Badly exported images (a few dark grey levels): detected, named, and rescaled identically in every path."""

import json

import numpy as np
import torch
from PIL import Image

from featurepipe.data import intensity
from featurepipe.models import create_model, load_checkpoint

from conftest import cli, make_arrays


def test_low_dynamic_range_is_detected_and_full_range_is_left_alone():
    images, _ = make_arrays(20, 28)
    full = intensity.measure(images)
    assert not full.low_range and full.window == intensity.FULL_RANGE
    dark = intensity.measure(images // 100)  # the mis-exported archive of issue 13: values 0-2
    assert dark.low_range and dark.window == (0.0, 2.0) and dark.levels == 3
    twelve_bit = intensity.measure(images // 16)  # 12-bit content in the bottom of 8 bits
    assert twelve_bit.low_range and twelve_bit.window[1] <= 16


def test_the_window_is_part_of_the_model_and_survives_its_checkpoint(tmp_path):
    from featurepipe.models import save_checkpoint

    torch.manual_seed(0)
    x = torch.randint(0, 86, (4, 1, 32, 32), dtype=torch.uint8)
    windowed = create_model("sixblock", 3, 1, [0.5], [0.25], window=(0, 85)).eval()
    full = create_model("sixblock", 3, 1, [0.5], [0.25]).eval()
    full.load_state_dict(windowed.state_dict())
    # Pixels 0..85 through the window (0, 85) are the full-range model's pixels 0..255.
    assert torch.allclose(windowed.scale(x), full.scale(x * 3), atol=1e-6)
    assert torch.allclose(windowed(x), full(x * 3), atol=1e-4)
    meta = {"arch": "sixblock", "num_classes": 3, "in_channels": 1, "mean": [0.5], "std": [0.25], "window": [0, 85],
            "img_size": 32, "class_names": ["a", "b", "c"]}
    save_checkpoint(tmp_path / "model.pt", windowed, meta)
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert torch.allclose(loaded(x), windowed(x), atol=1e-6)
    # Checkpoints from before the window existed load with the full range.
    del meta["window"]
    save_checkpoint(tmp_path / "old.pt", full, meta)
    assert load_checkpoint(tmp_path / "old.pt")[0].window == intensity.FULL_RANGE


def _dark_folder(root, n_per_class=12):
    images, labels = make_arrays(n_per_class, 32, seed=1)
    for i, (img, y) in enumerate(zip(images, labels)):
        path = root / f"class{y}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img // 50).astype(np.uint8)).save(path)  # grey levels 0-5
    return root


def test_train_cnn_and_data_inspect_name_a_dark_archive_and_every_stage_uses_its_window(tmp_path):
    data = _dark_folder(tmp_path / "dark")
    r = cli("data", "inspect", "--data", data)
    assert "LOW DYNAMIC RANGE" in r.output
    run = tmp_path / "run"
    r = cli("train-cnn", "--data", data, "--out", run, "--epochs", "2", "--arch", "sixblock")
    assert "LOW DYNAMIC RANGE" in r.output
    resolved = json.loads((run / "config.json").read_text())["train"]["resolved"]
    assert resolved["intensity"]["low_range"] and resolved["window"] == [0.0, 5.0]
    net, meta = load_checkpoint(run / "cnn" / "model.pt")
    assert net.window == (0.0, 5.0) and meta["window"] == [0.0, 5.0]
    # The mean/std the model normalises with are those of the rescaled images (not of values 0-5).
    assert 0.05 < resolved["mean"][0] < 0.95 and resolved["std"][0] > 0.05
