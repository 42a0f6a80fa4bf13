"""Grad-CAM of the CNN: the right layer, the model's own forward pass, and the known answer for sixblock."""

import json

import numpy as np
import torch

from featurepipe.explain import cam_layer, gradcam, read_test_images
from featurepipe.models import create_model, load_checkpoint
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths


def test_sixblock_gradcam_equals_the_class_activation_map(tiny_run):
    # sixblock ends in global average pooling and one linear layer, so Grad-CAM of its last block is
    # exactly CAM (Zhou et al., 2016): relu(sum_k w_ck A_k) / (H W). An independent computation of it:
    paths = run_paths(tiny_run)
    ids = json.loads(paths.splits.read_text())["test"][:6]
    images = np.stack(read_test_images(RunConfig.load(paths), ids))
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    net, _ = load_checkpoint(paths.checkpoint)
    classes = [0, 1, 2, 2, 1, 0]
    cams = gradcam(net, images, classes)

    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        maps = net.features.feature_maps(net.normalize(x))[-1]
        weights = net.head[1].weight[classes]
        cam = torch.relu(torch.einsum("nk,nkhw->nhw", weights, maps))[:, None] / (maps.shape[2] * maps.shape[3])
        expected = torch.nn.functional.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(cams, expected.numpy(), rtol=1e-4, atol=1e-7)
    assert cam_layer(net) is net.features.blocks[-1]
    assert not net.features.blocks[-1]._forward_hooks
    assert all(p.grad is None for p in net.parameters())


def test_gradcam_on_a_torchvision_backbone_uses_its_last_conv():
    torch.manual_seed(0)
    net = create_model("resnet18", 3, 3, [0.5] * 3, [0.25] * 3).eval()
    layer = cam_layer(net)
    assert layer is net.features.layer4[-1].conv2
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        before = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    cams = gradcam(net, images, [0, 2])
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() > 0
    with torch.no_grad():
        after = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(before, after)
    assert not layer._forward_hooks
