"""Which features the heads see: `extract --layer` and `--tta`, and Net.embed that computes them."""

import json

import h5py
import numpy as np
import pytest
import torch

from featurepipe.models import create_model, load_checkpoint
from featurepipe.models.embedding import pooled_last_blocks, tta_views

from conftest import cli


def test_default_embedding_is_the_penultimate_layer_without_tta():
    net = create_model("sixblock", 3, 1, [0.5], [0.25]).eval()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(net.embed(x), net.forward_features(x))
        # The CNN's own logits are its head on the embedding.
        torch.testing.assert_close(net.head(net.embed(x)), net(x))


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    net = create_model("sixblock", 2, 1, [0.5], [0.25]).eval()
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = (net.forward_features(x) + net.forward_features(x.flip(-1))) / 2
        torch.testing.assert_close(net.embed(x, tta="flip"), expected)


@pytest.mark.parametrize("tta,views", [("none", 1), ("flip", 2), ("crops", 5), ("flip+crops", 10)])
def test_tta_views_keep_the_image_size(tta, views):
    x = torch.rand(2, 3, 28, 28)
    out = tta_views(x, tta)
    assert len(out) == views and all(v.shape == x.shape for v in out)
    assert torch.equal(out[0], x)


def test_last2_on_sixblock_concatenates_the_last_two_blocks():
    net = create_model("sixblock", 2, 1, [0.5], [0.25]).eval()
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        f = net.embed(x, layer="last2")
        maps = net.features.feature_maps(net.normalize(x))
    assert f.shape == (2, 192 + 256) and net.embed_dim("last2", 28) == 448
    torch.testing.assert_close(f[:, :192], maps[-2].mean(dim=(2, 3)))
    torch.testing.assert_close(f[:, 192:], maps[-1].mean(dim=(2, 3)))


@pytest.mark.parametrize("arch,dims", [("resnet18", (256, 512)), ("densenet121", (1024, 1024)),
                                       ("efficientnet_b0", (112, 1280))])
def test_last2_on_torchvision_backbones_pools_the_last_two_stages(arch, dims):
    net = create_model(arch, 2, 3, [0.5] * 3, [0.25] * 3).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        f = net.embed(x, layer="last2")
    assert f.shape == (2, sum(dims)) and net.embed_dim("last2", 64) == sum(dims)
    if arch == "resnet18":
        with torch.no_grad():
            layer3 = net.features.layer3(net.features.layer2(net.features.layer1(net.features.maxpool(
                net.features.relu(net.features.bn1(net.features.conv1(net.normalize(x))))))))
        torch.testing.assert_close(f[:, :256], layer3.mean(dim=(2, 3)))
        torch.testing.assert_close(f[:, 256:], net.forward_features(x))  # layer4, pooled


def test_embed_dim_leaves_batchnorm_statistics_alone():
    net = create_model("sixblock", 2, 1, [0.5], [0.25]).train()
    before = net.features.blocks[0][1].running_mean.clone()
    net.embed_dim("last2", 28)
    assert torch.equal(net.features.blocks[0][1].running_mean, before) and net.training


def test_backbone_without_two_stages_is_refused():
    from featurepipe.errors import FeaturepipeError

    flat = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(FeaturepipeError, match="--layer last2.*use --layer penultimate"):
        pooled_last_blocks(flat, torch.rand(1, 1, 8, 8))


def test_extract_records_layer_and_tta_and_writes_those_features(tiny_run, tmp_path):
    out = tmp_path / "last2_flip.h5"
    source = json.loads((tiny_run / "config.json").read_text())["data"]["source"]
    cli("extract", "--run", tiny_run, "--data", source, "--out", out, "--layer", "last2", "--tta", "flip",
        "--device", "cpu")
    net, _ = load_checkpoint(tiny_run / "cnn" / "model.pt")
    from featurepipe.data import scan

    cat = scan(source)
    with h5py.File(out) as h5:
        assert h5.attrs["layer"] == "last2" and h5.attrs["tta"] == "flip"
        assert h5["train/features"].shape[1] == 448
        first_id = h5["test/ids"].asstr()[0]
        stored = h5["test/features"][0]
    x = torch.from_numpy(cat.store.read(cat.ids.index(first_id), 28, 1)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net.embed(x, "last2", "flip").numpy()[0]
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option,value", [("--layer", "first"), ("--tta", "rotate")])
def test_unknown_layer_or_tta_is_refused(tiny_run, tmp_path, option, value):
    r = cli("extract", "--run", tiny_run, "--data", "demo", "--out", tmp_path / "x.h5", option, value, ok=False)
    assert r.exit_code == 2 and f"{option} {value}: choose one of" in r.output
