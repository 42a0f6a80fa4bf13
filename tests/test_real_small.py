"""On the real few-hundred-image brain MRI set (../shared/data/brain-mri4-small) and its badly exported
copy: what training learns is what evaluation sees. Skipped where the folder is absent."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurepipe import data as fdata
from featurepipe.models import load_checkpoint

from conftest import cli

BRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-mri4-small"

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not BRAIN.exists(), reason=f"real data not found at {BRAIN}"),
]


@pytest.fixture(scope="module")
def dark_brain(tmp_path_factory) -> Path:
    """The same images with every pixel integer-divided by 100 (grey levels 0-2), saved as PNG: a
    mis-exported archive. Test split cut to 10 per class: these tests look at the training images."""
    root = tmp_path_factory.mktemp("dark") / "brain-dark"
    for path in sorted(BRAIN.rglob("*.jpg")):
        rel = path.relative_to(BRAIN)
        if rel.parts[0] == "test" and int(path.stem.split("_")[-1]) % 10:
            continue
        out = (root / rel).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(path).convert("L")) // 100).save(out)
    return root


def _train_accuracies(run: Path, data: Path) -> tuple[float, float]:
    """Accuracy on the training images, un-augmented: in eval mode (running statistics) and with
    BatchNorm normalising each batch by its own statistics (shuffled batches of 64)."""
    net, meta = load_checkpoint(run / "cnn" / "model.pt")
    catalog = fdata.scan(str(data))
    index = {k: i for i, k in enumerate(catalog.ids)}
    train = [index[k] for k in json.loads((run / "splits.json").read_text())["train"]]
    x = torch.from_numpy(np.stack([catalog.store.read(i, meta["img_size"], meta["in_channels"]) for i in train]))
    x, y = x.permute(0, 3, 1, 2), torch.as_tensor(catalog.labels[train])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    with torch.no_grad():
        net.eval()
        eval_acc = float((net(x).argmax(1) == y).float().mean())
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False  # batch statistics, and the running ones left alone
        batch_acc = float((torch.cat([net(x[i:i + 64]) for i in range(0, len(y), 64)]).argmax(1) == y).float().mean())
    return eval_acc, batch_acc


@pytest.mark.parametrize("which", ["as exported", "dark copy"])
def test_eval_mode_agrees_with_batch_statistics_on_the_training_images(which, dark_brain, tmp_path):
    data = BRAIN if which == "as exported" else dark_brain
    run = tmp_path / "run"
    # Default options (--arch auto, augmentation, EMA), a short schedule at a small size to stay quick.
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "3", "--img-size", "96", "--device", "cpu")
    eval_acc, batch_acc = _train_accuracies(run, data)
    # Before: the dark copy scored 0.47 in eval mode against 0.74 with batch statistics.
    assert abs(eval_acc - batch_acc) <= 0.05, (eval_acc, batch_acc)
    assert eval_acc > 0.5, eval_acc  # four classes: it learned something
