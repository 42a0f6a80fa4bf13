"""Decoding one image file into a uint8 array of the size and channel count the model wants."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featurepipe.errors import FeaturepipeError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"})

# An image whose header claims more pixels than this is refused before it is decoded (a decompression
# bomb: a 1 MB PNG can claim 30000 x 30000 pixels). The default is PIL's own hard limit (about 179 Mpx,
# e.g. 13 000 x 13 000); FEATUREPIPE_MAX_IMAGE_PIXELS raises or lowers it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


def max_image_pixels() -> int:
    """The limit; a bad value is the user's to fix, and the CLI asks for it before any work (cli._cli),
    so it is refused once instead of becoming every image's reason to be unreadable."""
    value = os.environ.get("FEATUREPIPE_MAX_IMAGE_PIXELS", "")
    try:
        limit = int(value) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        limit = 0
    if limit < 1:
        raise FeaturepipeError(f"FEATUREPIPE_MAX_IMAGE_PIXELS={value}: give a whole number of pixels above 0, "
                               f"e.g. {DEFAULT_MAX_PIXELS} (the default), or unset it")
    return limit


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 'L' (channels=1) or 'RGB' (channels=3)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit and float scans use a fraction of their range; stretch what is there to 0..255.
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        # NaN and infinite pixels (float scans with masked areas) become the darkest value.
        arr = np.where(finite, arr, lo)
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    elif img.mode in ("P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa"):
        img = img.convert("RGB") if channels == 3 or img.mode not in ("LA", "1") else img.convert("L")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def decode(img: Image.Image, size: int | None, channels: int) -> np.ndarray:
    """(H, W, C) uint8; resized to size x size (whole field of view, no crop) when size is given."""
    if size is not None and img.format == "JPEG":
        # Let libjpeg decode at a reduced scale straight away: much cheaper than a full decode + resize.
        img.draft("L" if channels == 1 else "RGB", (size, size))
    ImageOps.exif_transpose(img, in_place=True)
    # Grey images are resized as one channel and replicated after: a third of the work for RGB models.
    grey_to_rgb = channels == 3 and img.mode in GRAY_MODES
    img = to_channels(img, 1 if grey_to_rgb else channels)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a copy: torch wants writable memory
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return np.repeat(arr, 3, axis=2) if grey_to_rgb else arr


class UnreadableImage(FeaturepipeError):
    """One image that cannot be decoded; `reason` says why, without the path."""

    def __init__(self, where: str, reason: str = "") -> None:
        super().__init__(f"{where}: cannot read image ({reason}); fix or remove the file" if reason else where)
        self.where, self.reason = where, reason


def read_file(path: str, size: int | None, channels: int) -> np.ndarray:
    with open_image(path) as img:
        return decode(img, size, channels)


@contextlib.contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """The image at `path`, header read; whatever opening or decoding it raises inside the block
    becomes an UnreadableImage naming the file."""
    limit = max_image_pixels()  # outside the try: a bad setting is not this image's fault
    try:
        with warnings.catch_warnings():
            # Per-file chatter (palette transparency, odd EXIF) would flood the log of a large archive.
            warnings.simplefilter("ignore")
            # A file object, not the path: PIL memory-maps uncompressed files it opens by path, and on
            # that route (Pillow 13) a TIFF's EXIF orientation is lost for L, P, RGBA, CMYK and I;16.
            Image.MAX_IMAGE_PIXELS = None  # PIL's guard (warning, then an error without the size) is ours below
            with open(path, "rb") as f, Image.open(f) as img:
                if img.width * img.height > limit:
                    raise UnreadableImage(path, f"header claims {img.width}x{img.height} pixels, more than the "
                                                f"limit of {limit:,} (FEATUREPIPE_MAX_IMAGE_PIXELS)")
                yield img
    except UnreadableImage:
        raise
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, struct.error, EOFError, ... on bad data
        raise UnreadableImage(path, why_unreadable(path, e)) from None


def why_unreadable(path: str, e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, UnidentifiedImageError):
        return "empty file (0 bytes)" if _size(path) == 0 else "not an image format PIL can read"
    if isinstance(e, Image.DecompressionBombError):
        return f"header claims more than {max_image_pixels():,} pixels"
    message = str(e).replace(repr(str(path)), "").replace(str(path), "").strip(" :")
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def is_gray(img: Image.Image) -> bool:
    if img.mode in GRAY_MODES:
        return True
    if img.mode != "RGB":
        return False
    # Many X-ray archives store grey scans as RGB; a small thumbnail is enough to tell.
    arr = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.int16)
    return bool(np.abs(arr[..., 0] - arr[..., 1]).max() <= 2 and np.abs(arr[..., 1] - arr[..., 2]).max() <= 2)
