"""Decoding images: modes, EXIF orientation, colour, unreadable and broken files, bombs, the pixel limit."""

import csv
import io
import json
import struct
import zlib
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from featurepipe.data.images import read_file
from featurepipe.data.load import decode_all
from featurepipe.data.sources import FileStore

from conftest import CLASSES, cli, grey_pattern, messy_archive, prediction_file, write_images


# ---- modes, EXIF orientation, colour ---------------------------------------------------------------------------------

# exif_transpose's job, written independently with numpy: the array a viewer shows for each orientation.
ORIENTED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.T,
            6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, 1)}
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")


def in_mode(g: np.ndarray, mode: str) -> Image.Image:
    """The grey image `g` stored in `mode` without changing what it shows (up to the mode's precision)."""
    if mode == "P":
        img = Image.frombytes("P", (g.shape[1], g.shape[0]), g.tobytes())
        img.putpalette([v for i in range(256) for v in (i, i, i)])
        return img
    if mode == "1":
        return Image.fromarray(g, "L").convert("1", dither=Image.Dither.NONE)
    if mode == "I;16":
        return Image.fromarray(g.astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(g.astype(np.int32) * 1000 - 5000)
    if mode == "F":
        return Image.fromarray(g.astype(np.float32) / 255.0)
    return Image.fromarray(g, "L").convert(mode)


def shown(g: np.ndarray, mode: str) -> np.ndarray:
    return np.where(g >= 128, 255, 0).astype(np.uint8) if mode == "1" else g


def save(img: Image.Image, path: Path, orientation: int = 1, **kw) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **kw)
    return path


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_to_what_it_shows_with_exif_orientation(tmp_path, mode, channels):
    g = grey_pattern(12, 20)
    path = save(in_mode(g, mode), tmp_path / "scan.tif", orientation=6)  # TIFF stores all ten modes
    arr = read_file(str(path), None, channels)
    expected = ORIENTED[6](shown(g, mode))
    assert arr.shape == (20, 12, channels) and arr.dtype == np.uint8
    for c in range(channels):
        np.testing.assert_array_equal(arr[..., c], expected)


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "TIFF"),
                                      ("RGB", "JPEG")])
def test_colour_images_keep_their_colours(tmp_path, mode, fmt):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8, :, 0] = 200  # red top half
    rgb[8:, :, 2] = 180  # blue bottom half
    img = Image.fromarray(rgb, "RGB")
    img = img.quantize(4) if mode == "P" else img.convert(mode)
    path = save(img, tmp_path / f"x.{fmt.lower()}", orientation=3, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    arr = read_file(str(path), 16, 3).astype(int)
    expected = ORIENTED[3](rgb).astype(int)
    assert np.abs(arr - expected).max() <= (12 if fmt == "JPEG" else 0)


def test_float_scan_with_nan_and_inf_decodes(tmp_path):
    f = np.linspace(-1, 3, 64, dtype=np.float32).reshape(8, 8)
    f[0, :3] = [np.nan, np.inf, -np.inf]
    Image.fromarray(f).save(tmp_path / "f.tif")
    arr = read_file(str(tmp_path / "f.tif"), None, 1)[..., 0]
    assert arr[0, :3].tolist() == [0, 0, 0] and arr.max() == 255 and arr[7, 7] == 255


# ---- unreadable images: skipped, listed, or an error -----------------------------------------------------------------

def labelled_as_folder(ids, labels, class_names) -> bool:
    return all(i.split("/")[1] == class_names[y] for i, y in zip(ids, labels))


def test_unreadable_images_are_skipped_listed_and_shift_nothing(tmp_path):
    root = tmp_path / "archiv"
    broken = messy_archive(root)
    run = tmp_path / "run"
    r = cli("train-cnn", "--data", root, "--out", run, "--epochs", "1")
    assert r.output.count("warning: skipped 5 unreadable image(s)") == 1
    with open(run / "skipped.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["id"] for row in rows) == sorted(broken)
    assert all(row["reason"] and row["split"] == row["id"].split("/")[0] for row in rows)
    splits = json.loads((run / "splits.json").read_text(encoding="utf-8"))
    assert not set(broken) & {i for ids in splits.values() for i in ids}
    assert sum(len(v) for v in splits.values()) == 3 * (12 + 4 + 5)

    # Every later command reuses the split: the features hold exactly the readable images, each with its own label.
    cli("extract", "--run", run, "--device", "cpu")
    with h5py.File(run / "features.h5") as h5:
        for split, ids in splits.items():
            assert list(h5[split]["ids"].asstr()[:]) == ids
            assert labelled_as_folder(ids, h5[split]["labels"][:], sorted(CLASSES))
    with open(prediction_file(run, "cnn"), newline="", encoding="utf-8") as f:
        preds = list(csv.DictReader(f))
    assert [p["id"] for p in preds] == splits["test"]
    assert all(p["id"].split("/")[1] == p["true"] for p in preds)

    # Another source through the same CNN: the policy applies there too, its list lies beside the output file,
    # and the file holds the readable images only: here the very rows of the run's own features.
    out = tmp_path / "other.h5"
    cli("extract", "--run", run, "--data", root, "--out", out, "--batch-size", "5", "--device", "cpu")
    with open(tmp_path / "other.skipped.csv", newline="", encoding="utf-8") as f:
        assert sorted(row["id"] for row in csv.DictReader(f)) == sorted(broken)
    with h5py.File(out) as other, h5py.File(run / "features.h5") as own:
        for split in ("train", "val", "test"):
            assert list(other[split]["ids"].asstr()[:]) == list(own[split]["ids"].asstr()[:])
            np.testing.assert_allclose(other[split]["features"][:], own[split]["features"][:], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(other[split]["labels"][:], own[split]["labels"][:])


def test_an_image_broken_since_training_stops_extract_which_resumes_once_it_is_fixed(tmp_path):
    root = tmp_path / "data"
    write_images(root, 12)
    run = tmp_path / "run"
    cli("train-cnn", "--data", root, "--out", run, "--epochs", "1")
    cli("extract", "--run", run, "--batch-size", "4")
    whole = run.parent / "whole.h5"
    (run / "features.h5").rename(whole)
    splits = json.loads((run / "splits.json").read_text(encoding="utf-8"))
    victim = root / splits["val"][-1]  # images are streamed: train and most of val are written when it fails
    content = victim.read_bytes()
    victim.write_bytes(content[:30])

    r = cli("extract", "--run", run, "--batch-size", "4", ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith(f"featurepipe: error: {victim}: cannot read image")
    assert not (run / "features.h5").exists()
    with h5py.File(run / "features.h5.partial") as h5:
        assert int(h5["train"].attrs["done"]) == len(splits["train"])
        assert int(h5["val"].attrs["done"]) == 4 * ((len(splits["val"]) - 1) // 4)

    victim.write_bytes(content)
    assert "resuming" in cli("extract", "--run", run, "--batch-size", "4").output
    with h5py.File(run / "features.h5") as resumed, h5py.File(whole) as first:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(resumed[split]["features"][:], first[split]["features"][:])


def test_on_bad_image_error_stops_at_the_first_with_its_path(tmp_path):
    root = tmp_path / "archiv"
    messy_archive(root)
    r = cli("train-cnn", "--data", root, "--out", tmp_path / "run", "--on-bad-image", "error", ok=False)
    assert r.exit_code == 2
    assert f"{root / 'train' / 'bar' / 'leer.png'}: cannot read image (empty file (0 bytes))" in r.output
    assert not (tmp_path / "run" / "cnn" / "model.pt").exists()


def test_a_class_left_empty_by_skipping_is_refused(tmp_path):
    root = tmp_path / "data"
    write_images(root, 6)
    for f in (root / "dot").iterdir():
        f.write_bytes(b"")
    r = cli("train-cnn", "--data", root, "--out", tmp_path / "run", ok=False)
    assert r.exit_code == 2 and "class 'dot'" in r.output


# ---- any bytes: a correct image or a recorded skip -------------------------------------------------------------------

@st.composite
def odd_image(draw):
    """A valid image in an odd mode and format, with an EXIF orientation where the format has EXIF."""
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from({
        "1": ["TIFF", "PNG", "BMP"], "L": ["TIFF", "PNG", "BMP", "GIF", "WEBP"], "LA": ["TIFF", "PNG"],
        "P": ["TIFF", "PNG", "BMP", "GIF"], "RGB": ["TIFF", "PNG", "JPEG", "BMP", "WEBP"],
        "RGBA": ["TIFF", "PNG", "WEBP"], "CMYK": ["TIFF", "JPEG"], "I;16": ["TIFF", "PNG"], "I": ["TIFF"],
        "F": ["TIFF"],
    }[mode]))
    h, w = draw(st.integers(2, 24)), draw(st.integers(1, 24))  # two pixels at least: one black, one white
    orientation = draw(st.integers(1, 8)) if fmt in ("TIFF", "PNG", "JPEG", "WEBP") else 1
    g = grey_pattern(h, w, seed=draw(st.integers(0, 2**16)))
    buf = io.BytesIO()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    exif = Image.Exif()
    exif[0x0112] = orientation
    in_mode(g, mode).save(buf, fmt, exif=exif, **kw) if orientation > 1 else in_mode(g, mode).save(buf, fmt, **kw)
    lossless = fmt != "JPEG"
    return buf.getvalue(), ORIENTED[orientation](shown(g, mode)) if lossless else None


@st.composite
def broken_bytes(draw, images=odd_image()):
    """Random bytes, or a valid image truncated or with some bytes overwritten."""
    kind = draw(st.sampled_from(["random", "truncated", "overwritten"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(draw(images)[0])
    if kind == "truncated":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(good=odd_image(), bad=st.lists(broken_bytes(), min_size=1, max_size=3), channels=st.sampled_from([1, 3]))
def test_loader_yields_a_correct_image_or_records_a_skip_never_crashes(tmp_path_factory, good, bad, channels):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "good.img").write_bytes(good[0])
    for k, b in enumerate(bad):
        (folder / f"bad{k}.img").write_bytes(b)
    paths = [folder / "good.img", *(folder / f"bad{k}.img" for k in range(len(bad)))]
    expected = good[1]
    size = expected.shape[0] if expected is not None and expected.shape[0] == expected.shape[1] else 16
    # In-process (no worker) so each example is cheap; the worker path is the same item function.
    with mock.patch("featurepipe.data.workers.num_workers", return_value=0):
        images, failed = decode_all(FileStore(paths), np.arange(len(paths)), size, channels)
    assert 0 not in failed, failed.get(0)
    assert images.images.shape == (len(paths), size, size, channels) and images.images.dtype == np.uint8
    if expected is not None and expected.shape == (size, size):
        for c in range(channels):
            np.testing.assert_array_equal(images.images[0, :, :, c], expected)
    assert all(isinstance(why, str) and why for why in failed.values())


# ---- to the model's channels and size --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK"])
@pytest.mark.parametrize("channels", [1, 3])
def test_grey_and_colour_images_convert_to_the_model_channels(tmp_path, mode, channels):
    path = tmp_path / "img.tif"
    Image.new("RGB", (50, 30), (200, 100, 50)).convert(mode).save(path)
    from featurepipe.data.images import read_file

    arr = read_file(str(path), 32, channels)
    assert arr.shape == (32, 32, channels) and arr.dtype == np.uint8


def test_grey_image_for_an_rgb_model_is_its_rgb_conversion_resized(tmp_path):
    # Grey files are resized as one channel and replicated: the same pixels as resizing the RGB image.
    grey = (np.random.default_rng(0).random((300, 410)) * 255).astype(np.uint8)
    for name in ("g.jpg", "g.png"):
        Image.fromarray(grey).save(tmp_path / name)
        with Image.open(tmp_path / name) as img:
            if name.endswith(".jpg"):
                img.draft("RGB", (64, 64))
            expected = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR))
        np.testing.assert_array_equal(read_file(str(tmp_path / name), 64, 3), expected)


def test_loader_batches_from_memory_are_the_images_one_by_one():
    import torch
    from torch.utils.data import default_collate

    from featurepipe.data import ImageDataset, make_loader
    from featurepipe.data.sources import ArrayStore

    rng = np.random.default_rng(0)
    store = ArrayStore(rng.integers(0, 256, (20, 12, 12, 3), dtype=np.uint8), "arrays")
    ds = ImageDataset(store, np.arange(19, -1, -1), np.arange(20) % 3, 12, 3)
    loader = make_loader(ds, 6, shuffle=True, seed=1)
    seen = []
    for x, y, k, why in loader:
        one_by_one = default_collate([ds[int(i)] for i in k])
        assert torch.equal(x, one_by_one[0]) and torch.equal(y, one_by_one[1]) and why == one_by_one[3]
        assert x.dtype == torch.uint8 and y.dtype == k.dtype == torch.int64
        seen += k.tolist()
    assert sorted(seen) == list(range(20))
    # Images held at another size are read (resized) one by one, as before.
    resized = ImageDataset(store, np.arange(20), np.zeros(20), 8, 3)
    assert next(iter(make_loader(resized, 4)))[0].shape == (4, 3, 8, 8)


# ---- decompression bombs, the pixel limit ----------------------------------------------------------------------------

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A few-hundred-byte PNG whose header claims width x height pixels."""
    small = path.with_suffix(".tmp.png")
    Image.new("L", (8, 8)).save(small)
    data = bytearray(small.read_bytes())
    small.unlink()
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_skipped_before_decoding(tmp_path):
    data = tmp_path / "data"
    write_images(data, 8, size=28)
    png_claiming(data / "bar" / "bomb.png", 30000, 30000)
    r = cli("data", "inspect", "--data", data)
    assert "bomb.png" in r.output and "header claims 30000x30000 pixels" in r.output and "usable" in r.output
    run = tmp_path / "r"
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "1")
    assert "30000x30000" in (run / "skipped.csv").read_text()


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from featurepipe.data.images import UnreadableImage, read_file

    path = tmp_path / "x.png"
    Image.new("L", (40, 40)).save(path)
    monkeypatch.setenv("FEATUREPIPE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(UnreadableImage, match="40x40"):
        read_file(str(path), 28, 1)


@pytest.mark.parametrize("value", ["1e9", "0", "-5", "lots"])
def test_a_bad_pixel_limit_is_refused_once_before_any_image(tmp_path, monkeypatch, value):
    from conftest import refused
    from featurepipe.errors import FeaturepipeError

    write_images(tmp_path / "data", 3, size=28)
    monkeypatch.setenv("FEATUREPIPE_MAX_IMAGE_PIXELS", value)
    r = cli("data", "inspect", "--data", tmp_path / "data", ok=False)
    refused(r, f"FEATUREPIPE_MAX_IMAGE_PIXELS={value}", "whole number")
    assert "unreadable" not in r.output
    # Not an image's fault either where featurepipe is used as a library: the setting's error, not a skip.
    with pytest.raises(FeaturepipeError, match="FEATUREPIPE_MAX_IMAGE_PIXELS") as e:
        read_file(str(next((tmp_path / "data" / CLASSES[0]).iterdir())), 28, 1)
    assert type(e.value) is FeaturepipeError
