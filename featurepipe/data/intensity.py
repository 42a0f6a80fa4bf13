"""Low-dynamic-range data: detect it on the training images and choose the model's intensity window.

Archives exported badly (every pixel 0-2; 12- or 16-bit content squeezed into the bottom of 8 bits)
carry their anatomy in a few dark grey levels. Normalising by the data's mean and std copes with that
on paper, but anything that works in absolute intensity does not: pretrained weights' fixed
normalisation sees a black image, and a contrast augmentation turns a training image into something
no val or test image looks like. So such data are rescaled once, per data set, to the full range: a
window (lo, hi) in 0..255 that the model applies to every uint8 input (`models.Net.scale`), in
training, extract, predict and Grad-CAM alike.

Per data set rather than per image: one fixed gain keeps the brightness differences between images
(an image that is darker than the others stays so), and a single hot pixel cannot rescale an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FULL_RANGE = (0.0, 255.0)
# Rescale where the brightest pixels (99.9th percentile) of the training images sit below half the
# 8-bit range: a properly exported scan reaches near 255 (PneumoniaMNIST: 255; brain MRI: 255), and
# one using half the range or less has lost most of its grey levels to the export.
LOW_RANGE_BELOW = 128
PERCENTILE = 99.9


@dataclass(frozen=True)
class Intensity:
    """What the training images use of the 8-bit range, and the window the model will apply."""

    high: float  # the 99.9th percentile of the sampled pixels, 0..255
    levels: int  # distinct values among the sampled pixels
    window: tuple[float, float]

    @property
    def low_range(self) -> bool:
        return self.window != FULL_RANGE

    def describe(self) -> str:
        if not self.low_range:
            return f"full range (99.9th percentile {self.high:.0f} of 255, {self.levels} grey levels)"
        return (f"LOW DYNAMIC RANGE: the brightest pixels reach {self.high:.0f} of 255 ({self.levels} grey levels); "
                f"every image is rescaled by 255/{self.window[1]:.0f} for training and inference alike")


def measure(pixels: np.ndarray) -> Intensity:
    """From a sample of uint8 training pixels (any shape)."""
    # From the 256-bin histogram: a thousand 224-px images are 150 M pixels, which np.percentile would
    # copy to float64 (1.2 GB) and sort.
    counts = np.bincount(np.asarray(pixels, dtype=np.uint8).ravel(), minlength=256)
    if not counts.sum():
        return Intensity(255.0, 0, FULL_RANGE)
    high = float(np.searchsorted(np.cumsum(counts), PERCENTILE / 100 * counts.sum()))
    levels = int(np.count_nonzero(counts))
    window = (0.0, max(1.0, high)) if high < LOW_RANGE_BELOW else FULL_RANGE
    return Intensity(high, levels, window)


def apply(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """The model's scaling (`Net.scale`) on a numpy array of uint8 pixels: floats in [0, 1]."""
    lo, hi = window
    return np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
