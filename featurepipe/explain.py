"""Looking at individual test images: reading them back from the run's data, and Grad-CAM for the CNN.

Grad-CAM (Selvaraju et al., 2017): the gradient of one class's logit with respect to the last
convolutional feature maps, averaged over space, weights those maps; the positive part of the sum
shows where in the image the evidence for that class lies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from featurepipe import data as fdata
from featurepipe.data.fingerprint import check_same_data
from featurepipe.files import read_json
from featurepipe.models import Net, get_arch
from featurepipe.run_config import RunConfig


def read_test_images(cfg: RunConfig, ids: list[str]) -> list[np.ndarray]:
    """The run's test images with these ids, as the CNN saw them: (S, S, C) uint8 at the run's size."""
    catalog = cfg.train.scan(cfg.data.source)
    check_same_data(cfg.sections, catalog, "compare")  # else the gallery would show other images under these ids
    test = fdata.assign_splits(catalog, cfg.seed, read_json(cfg.paths.splits))["test"]
    position = {catalog.ids[i]: int(i) for i in test}
    size, channels = cfg.model.img_size, cfg.model.in_channels
    store = fdata.cache.reuse(catalog.store, size, channels)  # decoded by train-cnn
    return [store.read(position[id_], size, channels) for id_ in ids]


def cam_layer(net: Net) -> nn.Module:
    """The layer whose maps Grad-CAM weighs, as the architecture's registry entry names it."""
    return get_arch(net.arch).cam_layer(net.features)


def gradcam(net: Net, images: np.ndarray, classes: list[int], layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM maps (N, S, S) for `images` (N, S, S, C) uint8, one map per image for the class given for
    that image; computed through the model's own forward pass. Unscaled (≥ 0), so maps of different
    classes of one image can be shown on one colour scale; divide by the max for [0, 1]."""
    layer = layer or cam_layer(net)
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        captured["maps"] = output
        output.register_hook(lambda grad: captured.__setitem__("grads", grad))

    net.eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = net(x)
            chosen = logits[torch.arange(len(classes)), torch.as_tensor(classes)]
            net.zero_grad(set_to_none=True)
            chosen.sum().backward()
    finally:
        handle.remove()
        net.zero_grad(set_to_none=True)  # leave the model as it came
    maps, grads = captured["maps"].detach(), captured["grads"].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=1, keepdim=True))
    return nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()

