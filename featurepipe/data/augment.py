"""Training-time augmentation presets, on uint8 (C, H, W) tensors."""

from __future__ import annotations

import torch

AUGMENTATIONS = ("auto", "none", "light", "xray", "rgb")


def resolve_augmentation(preset: str, grey: bool) -> str:
    """'auto' means xray for grey images (X-ray, CT, MRI), rgb for colour (dermatology, endoscopy)."""
    if preset == "auto":
        return "xray" if grey else "rgb"
    return preset


class RandomGamma(torch.nn.Module):
    """Random gamma on uint8 images: exposure differences between scanners, without clipping."""

    def __init__(self, low: float = 0.7, high: float = 1.4, p: float = 0.5) -> None:
        super().__init__()
        self.low, self.high, self.p = low, high, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        gamma = self.low + (self.high - self.low) * float(torch.rand(()))
        return (x.float().div(255.0).pow(gamma).mul(255.0)).round().to(torch.uint8)


def augmentation(preset: str, size: int):
    """The transform for one preset (after resolve_augmentation); None for 'none'."""
    from torchvision.transforms import v2

    if preset == "none":
        return None
    # Mild geometry for every preset: medical images are centred and consistently scaled, so big
    # crops or rotations would cut away the anatomy that carries the label.
    geometry = [
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
    ]
    contrast = v2.ColorJitter(brightness=0.2, contrast=0.2)
    if preset == "light":
        return v2.Compose([*geometry, contrast])
    if preset == "xray":
        # No flips (anatomy has a side: the heart is on the left). Global equalisation, autocontrast and
        # gamma stand in for CLAHE: they vary the contrast curve the way different exposures do.
        return v2.Compose([*geometry, contrast, RandomGamma(), v2.RandomAutocontrast(p=0.2),
                           v2.RandomEqualize(p=0.1)])
    if preset == "rgb":
        # Skin and endoscopy images have no canonical orientation or exact colour balance.
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), *geometry, contrast,
                           v2.ColorJitter(saturation=0.2, hue=0.02),
                           v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2)])
    raise ValueError(f"unknown augmentation preset {preset!r}")
