"""data/gpu.py on the CPU: batches sliced from a device copy are the loader's own, and the device JPEG
decoder's routing and pixels (torchvision's decode_jpeg runs on the CPU too). tests/test_cuda.py runs
the same on a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_arrays, write_images
from featurepipe import data as fdata
from featurepipe.data import cache, gpu
from featurepipe.data.balance import BalancedSampler

CPU = torch.device("cpu")


def same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b) > 0
    for (x1, y1, k1, w1), (x2, y2, k2, w2) in zip(a, b):
        assert x1.shape == x2.shape and x1.dtype == x2.dtype == torch.uint8
        assert torch.equal(x1.cpu(), x2.cpu()) and torch.equal(y1.cpu(), y2.cpu()) and torch.equal(k1, k2)
        assert tuple(w1) == tuple(w2)


def memory_dataset(n_per_class=30, channels=1, offset=5):
    x, y = make_arrays(n_per_class)
    store = fdata.ArrayStore(np.repeat(x[..., None], channels, axis=3), "arrays")
    rows = np.arange(offset, len(x))  # a split: positions into the store, not 0..n
    return fdata.ImageDataset(store, rows, y[rows], 28, channels)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_device_batches_are_the_loaders_over_epochs(drop_last, channels, device=CPU):
    ds = memory_dataset(channels=channels)
    plain = fdata.make_loader(ds, 16, shuffle=True, seed=3, drop_last=drop_last)
    sliced = gpu.DeviceLoader(fdata.make_loader(ds, 16, shuffle=True, seed=3, drop_last=drop_last), device)
    assert len(sliced) == len(plain) and sliced.dataset is ds and sliced.drop_last == drop_last
    for epoch in range(3):  # the generator carries on from epoch to epoch, as in train-cnn
        if epoch == 2:
            for loader in (plain, sliced):
                loader.generator.manual_seed(99)
        same_batches(plain, sliced)


def test_device_batches_follow_a_sampler_and_given_batches(device=CPU):
    ds = memory_dataset()
    samplers = [BalancedSampler(ds.labels, 3), BalancedSampler(ds.labels, 3)]
    for s in samplers:
        s.generator.manual_seed(7)
    same_batches(fdata.make_loader(ds, 10, sampler=samplers[0]),
                 gpu.DeviceLoader(fdata.make_loader(ds, 10, sampler=samplers[1]), device))
    batches = [[0, 1, 2], [3, 4, 5, 6, 7], [8]]
    same_batches(fdata.make_loader(ds, None, batches=batches),
                 gpu.DeviceLoader(fdata.make_loader(ds, None, batches=batches), device))


def test_only_ready_in_memory_sources_on_an_accelerator_are_sliced(tmp_path, cache_dir):
    ds = memory_dataset()
    loader = fdata.make_loader(ds, 8)
    assert gpu.on_device(loader, CPU) is loader  # the CPU keeps its gathering loader
    assert gpu.sliceable(ds) and not gpu.sliceable(fdata.ImageDataset(ds.store, ds.indices, ds.labels, 32, 1))
    write_images(tmp_path / "files", 4)
    catalog = fdata.scan(str(tmp_path / "files"))
    rows = np.arange(len(catalog))
    assert not gpu.sliceable(fdata.ImageDataset(catalog.store, rows, catalog.labels, 28, 1))  # files
    disk = cache.for_archive(catalog.store, [len(catalog)], 28, 1)
    disk.fill(rows[:5])
    assert gpu.sliceable(fdata.ImageDataset(disk, rows[:5], catalog.labels[:5], 28, 1))
    assert not gpu.sliceable(fdata.ImageDataset(disk, rows, catalog.labels, 28, 1))  # not all decoded yet


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def test_only_plain_jpegs_within_the_pixel_limit_go_to_the_device(monkeypatch):
    grey, rgb = Image.new("L", (40, 30), 100), Image.new("RGB", (40, 30), (1, 2, 3))
    assert gpu.jpeg_header(jpeg(grey)) == (30, 40, 1) and gpu.jpeg_header(jpeg(rgb, progressive=True)) == (30, 40, 3)
    assert gpu.device_decodable(jpeg(grey)) and gpu.device_decodable(jpeg(rgb, progressive=True))
    assert not gpu.device_decodable(jpeg(Image.new("CMYK", (40, 30))))
    png = io.BytesIO()
    grey.save(png, "PNG")
    assert not gpu.device_decodable(png.getvalue())
    assert not gpu.device_decodable(b"\xff\xd8\xff") and not gpu.device_decodable(b"")
    monkeypatch.setenv("FEATUREPIPE_MAX_IMAGE_PIXELS", "1000")
    assert not gpu.device_decodable(jpeg(grey))  # 1200 pixels: the CPU decoder refuses it, naming the limit


def mixed_folder(root):
    """512-px JPEGs (grey and colour), a PNG, and broken files of every kind, in two class folders."""
    rng = np.random.default_rng(0)
    x, _ = make_arrays(3, size=64)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i, img in enumerate(x):
        big = Image.fromarray(img).resize((512, 512), Image.BICUBIC)
        (big.convert("RGB") if i % 2 else big).save(root / "ab"[i % 2] / f"{i}.jpg", quality=90)
    Image.fromarray(x[0]).save(root / "a" / "p.png")
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (root / "b" / "noise.jpg").write_bytes(b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    return fdata.scan(str(root))


@pytest.mark.parametrize("size,channels", [(224, 3), (64, 1)])
def test_device_decoding_routes_and_matches_the_cpu_decoder(tmp_path, size, channels, device=CPU, tolerance=(0.5, 3)):
    catalog = mixed_folder(tmp_path / "mixed")
    rows = np.arange(len(catalog))
    ds = fdata.ImageDataset(catalog.store, rows, catalog.labels, size, channels)
    batches = [list(range(0, 5)), list(range(5, len(rows)))]
    got = list(gpu.decode_on_device(ds, batches, device))
    expected = list(fdata.make_loader(ds, None, batches=batches, once=True))
    assert len(got) == len(expected)
    for (x, y, k, why), (x0, y0, k0, why0) in zip(got, expected):
        assert why == tuple(why0)  # the CPU decoder's verdicts, word for word
        assert torch.equal(y, y0) and torch.equal(k, k0) and x.shape == x0.shape and x.device.type == device.type
        for j, (a, b) in enumerate(zip(x.cpu().int(), x0.int())):
            d = (a - b).abs().float()
            if why[j]:
                assert d.max() == 0  # a blank image, as the loader yields
            else:  # rounding apart, the CPU path's reduced-scale decode and resize (measured: at most 2 levels)
                assert d.mean() < tolerance[0] and d.max() <= tolerance[1], (catalog.ids[k[j]], d.mean(), d.max())
    assert sum(bool(w) for *_, why in got for w in why) == 3
