"""Feeding an accelerator at its own speed (issue 16).

`on_device`: an in-memory source (.npz, demo, the training cache, the disk cache) copied to the device
once, and each of make_loader's batches gathered there: no per-item Python, no per-batch host copy.
The order is the loader's own (its sampler, generator, drop_last), so a run is the same either way.

`decode_on_device`: JPEG files decoded in batches by nvJPEG (torchvision.io.decode_jpeg on CUDA) and
resized on the device. Every other file, and every JPEG nvJPEG refuses, goes to the CPU decoder, which
alone judges an image unreadable: the bad-image policy and its reasons stay those of data/images.py.

On the CPU neither is used: loaders already gather batches from memory without a copy per image
(ImageDataset.__getitems__), and the model's threads need the cores a decode would take.
"""

from __future__ import annotations

import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from featurepipe.data.dataset import ImageDataset
from featurepipe.data.images import max_image_pixels

# A source goes to the device whole when it takes at most this share of the free device memory; else
# batches are gathered on the host into pinned memory and copied without blocking.
DEVICE_SHARE = 0.5

_on_device: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> its images on a device


def on_device(loader, device: torch.device):
    """`loader` (from make_loader) as a DeviceLoader where its dataset's store holds every image ready
    at the model's size and the device is an accelerator; else `loader` itself."""
    return DeviceLoader(loader, device) if device.type != "cpu" and sliceable(loader.dataset) else loader


def sliceable(ds: ImageDataset) -> bool:
    """Whether the dataset's store holds every one of its images ready at the model's size."""
    images = getattr(ds.store, "images", None)
    return images is not None and images.shape[1:] == (ds.size, ds.size, ds.channels) and \
        getattr(ds.store, "ready", lambda _: True)(ds.indices)


class DeviceLoader:
    """Yields what `loader` yields, (x, y, k, why), with x and y already on `device`."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, torch.device(device)
        ds: ImageDataset = loader.dataset
        self.images = _device_copy(ds.store, self.device)  # (N, H, W, C) uint8, on the device or pinned
        self.rows = torch.from_numpy(np.asarray(ds.indices, dtype=np.int64)).to(self.images.device)
        self.labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64)).to(self.device)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # dataset, batch_size, drop_last, sampler, generator
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        if self.loader.generator is not None:
            # A DataLoader's iterator draws a base seed for its workers before its sampler draws the order.
            torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        batches = [list(b) for b in self.loader.batch_sampler]
        if not batches:
            return
        order = torch.tensor([k for b in batches for k in b], dtype=torch.int64)
        on_images = order.to(self.images.device)  # one copy of the epoch's order, not one per batch
        labels = self.labels[order.to(self.device)]
        start = 0
        for b in batches:
            k = order[start:start + len(b)]
            x = self.images[self.rows[on_images[start:start + len(b)]]]
            if x.device != self.device:  # the host gather, pinned, then copied while the device works
                x = x.pin_memory().to(self.device, non_blocking=True)
            yield x.permute(0, 3, 1, 2), labels[start:start + len(b)], k, ("",) * len(b)
            start += len(b)


def _device_copy(store, device: torch.device) -> torch.Tensor:
    held = _on_device.get(store)
    if held is not None and held.device == device:
        return held
    images = store.images
    fits = device.type != "cuda" or images.nbytes <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.to(device) if fits else tensor
    _on_device[store] = tensor
    return tensor


# ---- JPEG decoding on the device ---------------------------------------------------------------------------

def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's frame header; None if `data` is not a JPEG or has none."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
        i += 2 + length
    return None


def jpeg_archive(store) -> bool:
    """Files, mostly JPEGs (by name): worth decoding on the device; others decode in loader workers."""
    paths = getattr(store, "paths", None)
    if store.in_memory or not paths:
        return False
    return sum(p.lower().endswith((".jpg", ".jpeg")) for p in paths) > len(paths) / 2


def device_decodable(data: bytes) -> bool:
    """Baseline or progressive JPEGs of 1 or 3 components within the pixel limit; CMYK, EXIF-less
    oddities and everything else are the CPU decoder's."""
    header = jpeg_header(data)
    return header is not None and header[2] in (1, 3) and 0 < header[0] * header[1] <= max_image_pixels()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) uint8 of a decoded JPEG → (C, size, size) uint8, as the CPU path makes it: libjpeg's
    reduced-scale decode (PIL's draft: a power of two, 1 to 8, that keeps both sides at least `size`),
    which averages blocks, then PIL's antialiased bilinear resize."""
    if x.shape[-2:] == (size, size):
        return x
    y = x[None].float()
    scale = next(s for s in (8, 4, 2, 1) if min(x.shape[-2] // size, x.shape[-1] // size) >= s)
    if scale > 1:
        y = F.avg_pool2d(y, scale, ceil_mode=True)
    if y.shape[-2:] != (size, size):
        y = F.interpolate(y, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8)


def decode_on_device(ds: ImageDataset, batches: list[list[int]], device: torch.device,
                     threads: int = 8) -> Iterator:
    """make_loader(ds, batches=...)'s batches from a FileStore, JPEGs decoded on `device`: (x, y, k, why)
    with x (N, C, S, S) uint8 on the device. Files are read by threads a batch ahead."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if ds.channels == 1 else ImageReadMode.RGB
    with ThreadPoolExecutor(threads) as pool:
        def read(batch):
            return [pool.submit(_bytes, ds.store.paths[int(ds.indices[k])]) for k in batch]

        ahead = read(batches[0]) if batches else []
        for n, batch in enumerate(batches):
            blobs = [f.result() for f in ahead]
            ahead = read(batches[n + 1]) if n + 1 < len(batches) else []
            images: list[torch.Tensor | None] = [None] * len(batch)
            why = [""] * len(batch)
            on_device = [j for j, blob in enumerate(blobs) if blob is not None and device_decodable(blob)]
            for j, img in zip(on_device, _decode_jpegs([blobs[j] for j in on_device], mode, device, decode_jpeg)):
                images[j] = None if img is None else resize(img, ds.size)
            rest = [j for j in range(len(batch)) if images[j] is None]
            # Not a JPEG, or refused: the CPU decoder reads it or says why not (PIL lets go of the GIL).
            for j, (x, _, _, reason) in zip(rest, pool.map(lambda j: ds[batch[j]], rest)):
                images[j], why[j] = x.to(device), reason
            x = torch.stack(images).contiguous(memory_format=torch.channels_last)
            k = torch.tensor(batch, dtype=torch.int64)
            yield x, torch.from_numpy(ds.labels[batch].astype(np.int64)), k, tuple(why)


def _bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None  # the CPU decoder says why


def _decode_jpegs(blobs: list[bytes], mode, device: torch.device, decode_jpeg) -> list[torch.Tensor | None]:
    """One batched call; where it fails, each image alone, None for those that still fail."""
    if not blobs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for torchcodec, which is not a dependency here.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=mode, device=device, apply_exif_orientation=True))
        except RuntimeError:
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=mode, device=device, apply_exif_orientation=True))
                except RuntimeError:
                    out.append(None)
            return out
