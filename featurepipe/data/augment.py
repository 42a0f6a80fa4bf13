"""Training-time augmentation, applied to whole batches on the training device.

Per-image torchvision transforms cost tens of microseconds per call each; on a 28-px image that is
more than the network's own step. Here every image still gets its own random parameters, but a
batch is transformed at once: one affine resampling (crop, zoom, rotation, shift, flips) and a few
element-wise intensity operations. On CUDA it runs on the GPU beside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

AUGMENTATIONS = ("auto", "none", "light", "xray", "rgb")


@dataclass(frozen=True)
class AugmentSpec:
    scale: tuple[float, float] = (0.8, 1.0)  # area of the random crop, as in RandomResizedCrop
    ratio: tuple[float, float] = (0.9, 1.1)  # its aspect ratio
    degrees: float = 10.0
    translate: float = 0.05  # fraction of the image size
    hflip: float = 0.0
    vflip: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: tuple[float, float] = (1.0, 1.0)
    gamma_p: float = 0.0
    saturation: float = 0.0
    blur_p: float = 0.0


PRESETS = {
    # Mild geometry everywhere: medical images are centred and consistently scaled, so big crops or
    # rotations would cut away the anatomy that carries the label.
    "light": AugmentSpec(),
    # No flips (anatomy has a side: the heart is on the left). Gamma varies the contrast curve the way
    # different exposures and scanners do, within bounds symmetric in log(gamma) (1/1.25 to 1.25) so the
    # images' mean and spread stay those of val and test on average. No autocontrast or equalisation:
    # they happen to no image at evaluation, and stretching one training image in five to the full
    # range taught BatchNorm statistics of images it never saw (a dark archive: test 0.43).
    "xray": AugmentSpec(gamma=(0.8, 1.25), gamma_p=0.5),
    # Skin and endoscopy images have no canonical orientation or exact colour balance.
    "rgb": AugmentSpec(hflip=0.5, vflip=0.5, saturation=0.2, blur_p=0.2),
}


def resolve_augmentation(preset: str, grey: bool) -> str:
    """'auto' means xray for grey images (X-ray, CT, MRI), rgb for colour (dermatology, endoscopy)."""
    if preset == "auto":
        return "xray" if grey else "rgb"
    return preset


def test_views(preset: str) -> str:
    """The views (models.embedding.TTA) a model trained with `preset` has learned to be indifferent to: the
    flips the preset makes. defaults.auto_tta decides where the CNN's predictions average them."""
    spec = PRESETS.get(preset)
    if spec is None or not spec.hflip:
        return "none"
    return "flips" if spec.vflip else "flip"


def augmentation(preset: str) -> "BatchAugment | None":
    """The batch transform for a resolved preset; None for 'none'."""
    if preset == "none":
        return None
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}")
    return BatchAugment(PRESETS[preset])


class BatchAugment(nn.Module):
    """(N, C, H, W) uint8 or [0, 1] float → augmented [0, 1] float of the same shape."""

    def __init__(self, spec: AugmentSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = self._geometry(x)
        return self._intensity(x).clamp_(0.0, 1.0)

    def _uniform(self, n: int, low: float, high: float, device) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, device=device)

    def _chance(self, n: int, p: float, device) -> torch.Tensor:
        return torch.rand(n, device=device) < p

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        s, n, dev = self.spec, x.shape[0], x.device
        area = self._uniform(n, *s.scale, dev)
        aspect = torch.exp(self._uniform(n, math.log(s.ratio[0]), math.log(s.ratio[1]), dev))
        w, h = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
        # Crop centre anywhere the crop fits, plus a shift; affine_grid's coordinates span [-1, 1].
        cx = (1 - w) * self._uniform(n, -1, 1, dev) + 2 * s.translate * self._uniform(n, -1, 1, dev)
        cy = (1 - h) * self._uniform(n, -1, 1, dev) + 2 * s.translate * self._uniform(n, -1, 1, dev)
        angle = torch.deg2rad(self._uniform(n, -s.degrees, s.degrees, dev))
        fx = torch.where(self._chance(n, s.hflip, dev), -1.0, 1.0)
        fy = torch.where(self._chance(n, s.vflip, dev), -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([w * fx * cos, -h * fy * sin, cx], dim=1),
            torch.stack([w * fx * sin, h * fy * cos, cy], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        s, n, dev = self.spec, x.shape[0], x.device
        per_image = (n, 1, 1, 1)
        x = x * self._uniform(n, 1 - s.brightness, 1 + s.brightness, dev).view(per_image)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * self._uniform(n, 1 - s.contrast, 1 + s.contrast, dev).view(per_image) + mean).clamp(0, 1)
        if s.gamma_p > 0:
            gamma = torch.where(self._chance(n, s.gamma_p, dev), self._uniform(n, *s.gamma, dev), 1.0)
            x = x.clamp(min=1e-6).pow(gamma.view(per_image))
        if s.saturation > 0 and x.shape[1] == 3:
            grey = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = grey + (x - grey) * self._uniform(n, 1 - s.saturation, 1 + s.saturation, dev).view(per_image)
        if s.blur_p > 0:
            # A 3x3 box blur on the chosen images only; depthwise convolutions are slow on CPUs.
            chosen = self._chance(n, s.blur_p, dev)
            if chosen.any():
                x = x.clone()
                x[chosen] = F.avg_pool2d(x[chosen], 3, stride=1, padding=1, count_include_pad=False)
        return x
