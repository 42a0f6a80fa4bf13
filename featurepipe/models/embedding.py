"""Which embedding the heads see: the layer it is taken from, and test-time augmentation (TTA).

`Net.embed` is the one way features leave a model, so `extract` and `predict` compute them
identically. Layers:
  penultimate  the pooled output of the last block (what the CNN's own linear head sees)
  last2        the pooled outputs of the last two blocks, concatenated (sixblock: blocks 5 and 6;
               torchvision backbones: the last two stages, a stage being everything computed at
               one feature-map resolution larger than 1x1, e.g. resnet's layer3 and layer4)
TTA views, whose embeddings are averaged:
  none         the image as it is
  flip         the image and its horizontal mirror
  flips        the image and its horizontal, vertical and double mirror: the `rgb` augmentation's flips,
               which the CNN's own predictions average for colour images (data.augment.test_views)
  crops        the image and its four corner crops (90 % of the side, resized back)
  flip+crops   the ten views above and their mirrors
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featurepipe.errors import FeaturepipeError

LAYERS = ("penultimate", "last2")
TTA = ("none", "flip", "flips", "crops", "flip+crops")
CROP_FRACTION = 0.9
_PADDING = (nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)  # ZeroPad2d is a ConstantPad2d


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FeaturepipeError(f"{option} {value}: choose one of {', '.join(choices)}")
    return value


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """Views of a float (N, C, H, W) batch, all of the input's size."""
    views = [x]
    if tta in ("crops", "flip+crops"):
        h, w = x.shape[-2:]
        ch, cw = max(1, round(CROP_FRACTION * h)), max(1, round(CROP_FRACTION * w))
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            crop = x[..., top:top + ch, left:left + cw]
            views.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    if tta in ("flip", "flip+crops"):
        views += [v.flip(-1) for v in views]
    if tta == "flips":
        views += [x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return views


def pooled_last_blocks(features: nn.Module, x: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
    """Globally average-pooled outputs of the last `n` blocks, earliest first, each (N, C_i)."""
    if hasattr(features, "feature_maps"):
        return [m.mean(dim=(2, 3)) for m in features.feature_maps(x)[-n:]]
    return _pooled_last_stages(features, x, n)


def _pooled_last_stages(model: nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """For backbones without `feature_maps`, found with forward hooks so that any torchvision family
    works without a table of its layer names: at each of the n smallest feature-map sizes before the
    global pooling, the output of the last of the outermost modules producing that size (resnet's
    layer3, densenet's denseblock3, efficientnet's and convnext's features[5]; not a layer inside the
    next block that runs before its stride). Padding layers' outputs (efficientnet_lite0 pads before
    each convolution) and 1x1 maps (squeeze-excitation pools inside blocks) are not stages."""
    depth = {m: name.count(".") for name, m in model.named_modules() if m is not model}
    global_pools = {m for m in model.children() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))}
    last: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
    pooled = False

    def hook(module: nn.Module, inputs, out) -> None:
        nonlocal pooled
        if module in global_pools:
            pooled = True  # what follows (classifier norms on 1x1 maps) is no longer a block
        elif (not pooled and not isinstance(module, _PADDING) and isinstance(out, torch.Tensor) and out.ndim == 4
              and out.shape[-2] * out.shape[-1] > 1):
            size = tuple(out.shape[-2:])
            if size not in last or depth[module] <= last[size][0]:
                # Pool now: a later in-place ReLU would otherwise change the stored tensor.
                last[size] = (depth[module], out.mean(dim=(2, 3)))

    handles = [m.register_forward_hook(hook) for m in depth]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    sizes = sorted(last, key=lambda s: s[0] * s[1])[:n]
    if len(sizes) < n:
        raise FeaturepipeError(
            f"--layer last{n}: {type(model).__name__} has fewer than {n} feature-map stages; use --layer penultimate"
        )
    return [last[s][1] for s in reversed(sizes)]
