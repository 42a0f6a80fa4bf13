"""Decoding one image file into a uint8 array of the size and channel count the model wants."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"})

# Medical archives are large, trusted files; PIL's bomb guard only rejects honest 2000+ px scans.
Image.MAX_IMAGE_PIXELS = None

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 'L' (channels=1) or 'RGB' (channels=3)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit and float scans use a fraction of their range; stretch what is there to 0..255.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    elif img.mode in ("P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa"):
        img = img.convert("RGB") if channels == 3 or img.mode not in ("LA", "1") else img.convert("L")
    return img.convert("L" if channels == 1 else "RGB")


def decode(img: Image.Image, size: int | None, channels: int) -> np.ndarray:
    """(H, W, C) uint8; resized to size x size (whole field of view, no crop) when size is given."""
    if size is not None and img.format == "JPEG":
        # Let libjpeg decode at a reduced scale straight away: much cheaper than a full decode + resize.
        img.draft("L" if channels == 1 else "RGB", (size, size))
    img = ImageOps.exif_transpose(img)
    img = to_channels(img, channels)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a copy: torch wants writable memory
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_file(path: str, size: int | None, channels: int) -> np.ndarray:
    with Image.open(path) as img:
        return decode(img, size, channels)


def is_gray(img: Image.Image) -> bool:
    if img.mode in GRAY_MODES:
        return True
    if img.mode != "RGB":
        return False
    # Many X-ray archives store grey scans as RGB; a small thumbnail is enough to tell.
    arr = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.int16)
    return bool(np.abs(arr[..., 0] - arr[..., 1]).max() <= 2 and np.abs(arr[..., 1] - arr[..., 2]).max() <= 2)
