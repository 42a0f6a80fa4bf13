import csv

import numpy as np
import pytest
from PIL import Image

from featurepipe.data import assign_splits, scan, split_ids
from featurepipe.data.images import read_file
from featurepipe.data.splits import stratified_split
from featurepipe.errors import FeaturepipeError

from conftest import CLASSES, write_images


def test_class_folders_split_70_15_15_stratified(class_folders):
    cat = scan(str(class_folders))
    assert cat.class_names == sorted(CLASSES)
    assert len(cat) == 30 and cat.given_split is None
    splits = assign_splits(cat, seed=0)
    sizes = {s: len(v) for s, v in splits.items()}
    assert sizes == {"train": 22, "val": 4, "test": 4}  # round(0.15 * 30) = 4
    for idx in splits.values():
        assert set(cat.labels[idx]) == {0, 1, 2}  # every class in every split
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(30))  # a partition: nothing lost, nothing twice


def test_class_folder_split_is_seeded_and_reusable(class_folders):
    cat = scan(str(class_folders))
    a, b, c = assign_splits(cat, 0), assign_splits(cat, 0), assign_splits(cat, 1)
    assert all((a[s] == b[s]).all() for s in a)
    assert any(set(a[s]) != set(c[s]) for s in a)
    saved = split_ids(cat, a)
    again = assign_splits(scan(str(class_folders)), seed=99, saved=saved)
    assert all((again[s] == a[s]).all() for s in a)


def test_saved_split_refuses_changed_data(class_folders):
    cat = scan(str(class_folders))
    saved = split_ids(cat, assign_splits(cat, 0))
    (class_folders / saved["test"][0]).unlink()
    with pytest.raises(FeaturepipeError, match="data changed"):
        assign_splits(scan(str(class_folders)), 0, saved)


def test_train_val_test_folders_keep_their_split(split_folders):
    cat = scan(str(split_folders))
    splits = assign_splits(cat, 0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 36, "val": 12, "test": 15}
    assert all(cat.ids[i].startswith("test/") for i in splits["test"])


def test_train_test_only_carves_stratified_val_from_train(train_test_folders):
    cat = scan(str(train_test_folders))
    splits = assign_splits(cat, 0)
    assert all(cat.ids[i].startswith("train/") for i in splits["val"])
    assert all(cat.ids[i].startswith("test/") for i in splits["test"])
    assert len(splits["test"]) == 15
    assert set(cat.labels[splits["val"]]) == {0, 1, 2}
    assert not set(splits["val"]) & set(splits["train"])


def test_csv_manifest_with_and_without_split(tmp_path, csv_manifest):
    cat = scan(str(csv_manifest))
    assert cat.class_names == sorted(CLASSES) and len(cat) == 30
    assert cat.store.read(0, 28, 1).shape == (28, 28, 1)
    with_split = tmp_path / "with_split.csv"
    rows = list(csv.reader(csv_manifest.open()))
    with with_split.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for k, (p, label) in enumerate(rows[1:]):
            w.writerow([p, label, ["train", "train", "valid", "test"][k % 4]])
    cat = scan(str(with_split))
    splits = assign_splits(cat, 0)
    assert len(splits["val"]) == 7 and len(splits["test"]) == 7


def test_csv_missing_column_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,label\na.png,x\n")
    with pytest.raises(FeaturepipeError, match="missing column"):
        scan(str(bad))


def test_npz_keeps_official_split(npz_file):
    cat = scan(str(npz_file))
    splits = assign_splits(cat, 0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 120, "val": 30, "test": 36}
    assert cat.class_names == ["0", "1", "2"]
    assert cat.ids[splits["test"][0]] == "test/000000"


def test_demo_is_sklearn_digits():
    cat = scan("demo")
    assert len(cat) == 1797 and cat.class_names == [str(d) for d in range(10)]
    assert cat.store.read(0, 28, 1).shape == (28, 28, 1)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK"])
@pytest.mark.parametrize("channels", [1, 3])
def test_grey_and_colour_images_convert_to_the_model_channels(tmp_path, mode, channels):
    path = tmp_path / "img.tif"
    Image.new("RGB", (50, 30), (200, 100, 50)).convert(mode).save(path)
    from featurepipe.data.images import read_file

    arr = read_file(str(path), 32, channels)
    assert arr.shape == (32, 32, channels) and arr.dtype == np.uint8


def test_unknown_source_and_empty_class_are_refused(tmp_path):
    with pytest.raises(FeaturepipeError, match="no such file"):
        scan(str(tmp_path / "nope"))
    write_images(tmp_path / "data", 3)
    (tmp_path / "data" / "empty").mkdir()
    with pytest.raises(FeaturepipeError, match="'empty' has no images"):
        scan(str(tmp_path / "data"))


def test_single_class_is_refused(tmp_path):
    write_images(tmp_path / "data", 5)
    for c in CLASSES[1:]:
        for f in (tmp_path / "data" / c).iterdir():
            f.unlink()
        (tmp_path / "data" / c).rmdir()
    with pytest.raises(FeaturepipeError, match="single class"):
        assign_splits(scan(str(tmp_path / "data")), 0)


def test_stratified_split_fractions():
    labels = np.array([0] * 100 + [1] * 20)
    parts = stratified_split(labels, {"test": 0.15, "val": 0.15}, seed=0, rest="train")
    assert np.bincount(labels[parts["test"]]).tolist() == [15, 3]
    assert np.bincount(labels[parts["train"]]).tolist() == [70, 14]
    rare = np.array([0] * 3 + [1] * 50)
    parts = stratified_split(rare, {"test": 0.15, "val": 0.15}, seed=0, rest="train")
    assert all(set(rare[idx]) == {0, 1} for idx in parts.values())  # a rare class still reaches every split


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
