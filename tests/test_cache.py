"""The disk cache (data/cache.py): splits too big for memory are decoded once, to disk, and read back
as the streaming path would have read them."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import cli, messy_archive, write_images
from featurepipe import data as fdata
import featurepipe.data.workers as workers_module
from featurepipe.data import cache
from featurepipe.data.sources import FileStore
from featurepipe.errors import FeaturepipeError
from featurepipe.explain import read_test_images
from featurepipe.run_config import RunConfig
from featurepipe.runs import run_paths


def no_decoding(monkeypatch):
    """Any decode of an image file from here on fails the test (loaders read a DiskCache in-process)."""
    def refuse(self, i, size, channels):
        raise AssertionError(f"decoded {self.paths[i]}")

    monkeypatch.setattr(FileStore, "read", refuse)


def load(root, size=24, channels=1, on_bad="skip"):
    catalog = fdata.scan(str(root))
    splits = fdata.assign_splits(catalog, 0)
    return catalog, fdata.load_splits(catalog, splits, size, channels, on_bad)


def test_cached_splits_hold_the_streamed_pixels_and_skip_the_same_images(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "archiv"
    messy_archive(root)
    catalog, (stores, kept, skipped) = load(root, channels=3)
    disk = stores["train"][0]
    assert isinstance(disk, fdata.DiskCache) and all(s is disk for s, _ in stores.values())
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", "off")
    _, (streamed, kept_streaming, skipped_streaming) = load(root, channels=3)
    assert skipped == skipped_streaming and len(skipped) == 5
    for split in fdata.SPLITS:
        np.testing.assert_array_equal(kept[split], kept_streaming[split])
        store, positions = stores[split]
        assert store.ready(positions)
        ds = fdata.ImageDataset(store, positions, catalog.labels[positions], 24, 3)
        x, _, _, why = ds.__getitems__(list(range(len(ds))))  # gathered from the map
        expected = np.stack([catalog.store.read(int(i), 24, 3) for i in positions])
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), expected)
        assert not any(why)
    assert len(list(cache_dir.iterdir())) == 2  # the cache's folder and its lock


def test_a_rerun_decodes_nothing_and_keeps_the_skipped_list(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "archiv"
    messy_archive(root)
    _, (_, kept, skipped) = load(root)
    no_decoding(monkeypatch)
    monkeypatch.setattr(workers_module, "each_image", None)  # not even the check pass runs
    _, (_, again, skipped_again) = load(root)
    assert skipped_again == skipped
    assert all(np.array_equal(kept[s], again[s]) for s in kept)


def test_error_policy_names_the_same_first_image_as_streaming(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "archiv"
    messy_archive(root)
    with pytest.raises(fdata.UnreadableImage) as cached:
        load(root, on_bad="error")
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", "off")
    with pytest.raises(fdata.UnreadableImage) as streamed:
        load(root, on_bad="error")
    assert str(cached.value) == str(streamed.value)


def test_an_interrupted_fill_continues_where_its_last_record_stopped(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "data"
    write_images(root, 20)
    monkeypatch.setattr(cache, "RECORD_ROWS", 8)
    real = workers_module.each_image

    def interrupted(store, indices, fn, description):
        for n, item in enumerate(real(store, indices, fn, description)):
            if n == 25:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(workers_module, "each_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(root)
    decoded = []

    def counted(store, indices, fn, description):
        decoded.extend(indices.tolist())
        return real(store, indices, fn, description)

    monkeypatch.setattr(workers_module, "each_image", counted)
    catalog, (stores, _, _) = load(root)
    # 25 rows were decoded and recorded before the interruption (a record at every 8, and one on the way out).
    assert len(catalog) - 25 <= len(decoded) < len(catalog)
    disk = stores["train"][0]
    every = np.arange(len(catalog))
    assert disk.ready(every)
    np.testing.assert_array_equal(disk.images[every], np.stack([catalog.store.read(int(i), 24, 1) for i in every]))


@pytest.mark.parametrize("damage", ["truncated", "row", "state"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, cache_dir, damage, capsys):
    root = tmp_path / "data"
    write_images(root, 6)
    catalog, (stores, _, _) = load(root)
    folder = stores["train"][0].folder
    if damage == "truncated":
        with open(folder / "images.npy", "r+b") as f:
            f.truncate(1000)
    elif damage == "row":
        with open(folder / "images.npy", "r+b") as f:
            f.seek(-100, os.SEEK_END)
            f.write(b"\x07" * 100)
    else:
        (folder / "state.json").write_text("{", encoding="utf-8")
    capsys.readouterr()
    _, (stores, _, _) = load(root)
    assert "is damaged" in capsys.readouterr().err
    every = np.arange(len(catalog))
    assert stores["train"][0].ready(every)
    np.testing.assert_array_equal(stores["train"][0].images[every],
                                  np.stack([catalog.store.read(int(i), 24, 1) for i in every]))


def test_the_key_follows_the_files_the_size_and_the_channels(tmp_path):
    root = tmp_path / "data"
    write_images(root, 2)
    store = fdata.scan(str(root)).store
    first = cache.key(store, 24, 1)
    assert cache.key(store, 24, 3) != first and cache.key(store, 32, 1) != first
    path = store.paths[0]
    os.utime(path, ns=(0, 12345))
    assert cache.key(store, 24, 1) != first


def test_small_splits_stay_in_memory_and_no_room_streams_with_a_warning(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    write_images(root, 4)
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", str(tmp_path / "cache"))
    _, (stores, _, _) = load(root)
    assert isinstance(stores["train"][0], fdata.ArrayStore)  # under the 4 GiB cap: memory, as before
    monkeypatch.setenv("FEATUREPIPE_CACHE_BYTES", "1")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: type("u", (), {"free": 10})())
    catalog, (stores, _, _) = load(root)
    assert stores["train"][0] is catalog.store
    assert "no room for a decode cache" in capsys.readouterr().err


def test_a_bad_memory_cap_is_one_line(monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE_BYTES", "lots")
    with pytest.raises(FeaturepipeError, match="FEATUREPIPE_CACHE_BYTES=lots: give a number of bytes"):
        cache.fits_in_memory(10, 28, 1)


def test_extract_and_the_gallery_after_training_decode_no_image(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "data"
    write_images(root, 12)
    run = tmp_path / "run"
    cli("train-cnn", "--data", root, "--out", run, "--epochs", "2", "--batch-size", "8")
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", "off")
    cli("extract", "--run", run, "--device", "cpu", "--batch-size", "8")
    streamed = run.parent / "streamed.h5"
    (run / "features.h5").rename(streamed)
    config = RunConfig.load(run_paths(run))
    test_ids = json.loads((run / "splits.json").read_text())["test"]
    decoded = read_test_images(config, test_ids)  # from the files
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", str(cache_dir))
    with monkeypatch.context() as m:
        no_decoding(m)
        out = cli("extract", "--run", run, "--device", "cpu", "--batch-size", "8").output
        assert "reading decoded images from" in out
        cli("fit-heads", "--run", run, "--heads", "logreg")
        cli("compare", "--run", run)
        np.testing.assert_array_equal(np.stack(read_test_images(config, test_ids)), np.stack(decoded))
    with h5py.File(run / "features.h5") as cached, h5py.File(streamed) as first:
        for split in fdata.SPLITS:
            np.testing.assert_array_equal(cached[split]["ids"][:], first[split]["ids"][:])
            np.testing.assert_allclose(cached[split]["features"][:], first[split]["features"][:], rtol=1e-6, atol=1e-6)


def test_training_from_the_disk_cache_learns_the_in_memory_weights(tmp_path, cache_dir, monkeypatch):
    """Bit for bit: the same pixels (the test above) in the same batches through the same gathering path.
    (Streaming through loader workers is not bit-identical to either: it never was to memory.)"""
    import torch

    root = tmp_path / "data"
    write_images(root, 10)
    args = ["--data", root, "--epochs", "2", "--batch-size", "8", "--seed", "1"]
    cli("train-cnn", *args, "--out", tmp_path / "cached")
    monkeypatch.delenv("FEATUREPIPE_CACHE_BYTES")  # under the cap: in memory
    cli("train-cnn", *args, "--out", tmp_path / "memory")
    state = [torch.load(tmp_path / run / "cnn" / "model.pt", weights_only=False)["state_dict"]
             for run in ("cached", "memory")]
    assert state[0].keys() == state[1].keys()
    for name in state[0]:
        assert torch.equal(state[0][name], state[1][name]), name


def test_a_full_disk_while_filling_is_one_line_and_keeps_the_rows_recorded(tmp_path, cache_dir, monkeypatch):
    import errno

    root = tmp_path / "data"
    write_images(root, 6)
    monkeypatch.setattr(cache, "RECORD_ROWS", 4)
    real, calls = os.pwrite, []

    def fills_up(fd, data, offset):
        calls.append(offset)
        if len(calls) > 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(cache.os, "pwrite", fills_up)
    with pytest.raises(FeaturepipeError, match="cannot write .No space left on device.; free space"):
        load(root)
    monkeypatch.setattr(cache.os, "pwrite", real)
    catalog = fdata.scan(str(root))
    disk = cache.reuse(catalog.store, 24, 1)
    assert int((disk.status == cache.OK).sum()) == 9  # the rows written before the disk filled up
    every = np.flatnonzero(disk.status == cache.OK)
    np.testing.assert_array_equal(disk.images[every], np.stack([catalog.store.read(int(i), 24, 1) for i in every]))


def test_an_image_rewritten_in_place_with_its_mtime_put_back_is_not_served_from_the_cache(tmp_path, cache_dir):
    root = tmp_path / "data"
    files = [p for p, _ in write_images(root, 4, ext=".bmp")]  # BMP: the same byte size for other pixels
    catalog, _ = load(root)
    path = files[0]
    before = os.stat(path)
    new = np.asarray(Image.open(files[1]))
    with open(path, "r+b") as f:  # in place, as `cp -p` or `rsync -t --inplace` would, mtime restored
        Image.fromarray(new).save(f, format="BMP")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    i = catalog.store.paths.index(str(path))
    store = cache.reuse(fdata.scan(str(root)).store, 24, 1)
    np.testing.assert_array_equal(store.read(i, 24, 1), catalog.store.read(i, 24, 1))
    np.testing.assert_array_equal(store.read(i, 24, 1), catalog.store.read(catalog.store.paths.index(str(files[1])),
                                                                             24, 1))


def test_a_damaged_row_is_decoded_from_its_file_and_rewritten_by_the_next_fill(tmp_path, cache_dir, monkeypatch,
                                                                                 capsys):
    root = tmp_path / "data"
    write_images(root, 6)
    monkeypatch.setattr(cache, "CHECKED_ROWS", 0)  # a row the opening sample misses (64 of 300 in the issue)
    catalog, (stores, _, _) = load(root)
    disk = stores["train"][0]
    i, row = 5, 24 * 24
    with open(disk.data, "r+b") as f:
        f.seek(cache._header_bytes(disk.shape) + i * row + 100)
        f.write(b"\x07" * 50)
    capsys.readouterr()
    every = np.arange(len(catalog))
    truth = np.stack([catalog.store.read(int(k), 24, 1) for k in every])
    disk = cache.reuse(fdata.scan(str(root)).store, 24, 1)
    assert isinstance(disk, fdata.DiskCache)
    assert not disk.ready(every)  # the gathering path falls back to reading item by item
    ds = fdata.ImageDataset(disk, every, catalog.labels, 24, 1)
    np.testing.assert_array_equal(np.stack([ds[k][0].permute(1, 2, 0).numpy() for k in range(len(ds))]), truth)
    assert f"row {i}" in capsys.readouterr().err
    disk.fill(every)
    assert disk.ready(every)
    np.testing.assert_array_equal(cache.reuse(fdata.scan(str(root)).store, 24, 1).images[every], truth)


@pytest.mark.parametrize("where", ["cache_dir_is_a_file", "key_is_a_file", "key_is_a_link", "lock_is_a_folder"])
def test_an_unusable_cache_folder_is_a_warning_and_the_images_are_decoded(tmp_path, cache_dir, monkeypatch, capsys,
                                                                          where):
    root = tmp_path / "data"
    write_images(root, 4)
    catalog = fdata.scan(str(root))
    folder = cache_dir / cache.key(catalog.store, 24, 1)
    cache_dir.mkdir()
    if where == "cache_dir_is_a_file":
        cache_dir.rmdir()
        cache_dir.write_text("not a folder")
    elif where == "key_is_a_file":
        folder.write_text("x")
    elif where == "key_is_a_link":
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere")
    else:
        cache.lock_path(folder).mkdir()
    catalog, (stores, kept, _) = load(root)
    assert "warning: no decode cache" in capsys.readouterr().err
    assert stores["train"][0] is catalog.store and sum(len(k) for k in kept.values()) == len(catalog)
    assert cache.reuse(catalog.store, 24, 1) is catalog.store
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())


def test_a_seed_trains_one_model_whether_the_cache_is_empty_full_or_off(tmp_path, cache_dir, monkeypatch):
    """A full cache decodes nothing; that must not move the training's random stream (issue 35, case 1)."""
    root = tmp_path / "data"
    write_images(root, 12, size=32)
    args = ["--data", root, "--epochs", "1", "--seed", "0"]
    cli("train-cnn", *args, "--out", tmp_path / "empty")
    cli("train-cnn", *args, "--out", tmp_path / "full")
    monkeypatch.setenv("FEATUREPIPE_CACHE_DIR", "off")
    cli("train-cnn", *args, "--out", tmp_path / "off")
    weights = {run: (tmp_path / run / "cnn" / "model.pt").read_bytes() for run in ("empty", "full", "off")}
    assert weights["full"] == weights["empty"] == weights["off"]
