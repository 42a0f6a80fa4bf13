"""Data sources: class folders, split folders, CSV manifests, .npz, the demo; splits, groups, hidden files."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurepipe.data import assign_splits, scan, split_ids
from featurepipe.data.splits import broken_groups, stratified_split
from featurepipe.errors import FeaturepipeError

from conftest import CLASSES, cli, grey_pattern, make_arrays, refused, write_images


# ---- layouts and splits ----------------------------------------------------------------------------------------------

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


def test_demo_is_sklearn_digits():
    cat = scan("demo")
    assert len(cat) == 1797 and cat.class_names == [str(d) for d in range(10)]
    assert cat.store.read(0, 28, 1).shape == (28, 28, 1)


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


# ---- what a scan skips, odd file names -------------------------------------------------------------------------------

def test_hidden_and_non_image_files_are_ignored(tmp_path):
    root = tmp_path / "data"
    write_images(root, 4)
    for junk in ["bar/.DS_Store", "bar/._img_0_000.png", "column/Thumbs.db", "column/desktop.ini", "dot/notes.txt",
                 "dot/.hidden/x.png", "__MACOSX/bar/._x.png", "@eaDir/x.png/SYNOFILE_THUMB_M.png", ".git/x.png"]:
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\x00\x05not an image")
    cat = scan(str(root))
    assert cat.class_names == sorted(CLASSES) and len(cat) == 12
    assert all(Path(i).suffix == ".png" and not Path(i).name.startswith(".") for i in cat.ids)


def test_non_ascii_paths_in_folders_and_csv(tmp_path):
    root = tmp_path / "données"
    for k, cls in enumerate(["lungenentzündung", "正常", "ñormal"]):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(grey_pattern(10, 10, seed=3 * k + j)).save(root / cls / f"bild_{j}_é.png")
    cat = scan(str(root))
    assert cat.class_names == sorted(["lungenentzündung", "正常", "ñormal"])
    assert cat.store.read(0, 10, 1).shape == (10, 10, 1)
    manifest = root / "清单.csv"
    manifest.write_text("path,label\n" + "".join(f"{i},{cat.class_names[y]}\n" for i, y in zip(cat.ids, cat.labels)),
                        encoding="utf-8")
    from_csv = scan(str(manifest))
    assert from_csv.ids == cat.ids and from_csv.store.read(len(cat) - 1, 10, 1).shape == (10, 10, 1)


# ---- groups (patients) kept whole ------------------------------------------------------------------------------------

def grouped_manifest(tmp_path: Path, with_split: str | None = None) -> Path:
    """60 patients with 1-4 images each; a patient's images all share the patient's class."""
    rng = np.random.default_rng(0)
    rows, n = [], 0
    for patient in range(60):
        label = CLASSES[patient % 3]
        for _ in range(rng.integers(1, 5)):
            rows.append((f"img/{n:04d}.png", label, f"p{patient:02d}"))
            n += 1
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", *(["split"] if with_split else [])])
        for k, (p, label, group) in enumerate(rows):
            w.writerow([p, label, group, *([with_split(k, group)] if with_split else [])])
    return path


def test_featurepipes_splits_keep_each_group_whole(tmp_path):
    cat = scan(str(grouped_manifest(tmp_path)))
    for seed in range(3):
        splits = assign_splits(cat, seed)
        assert broken_groups(cat, splits) == {}
        sizes = {s: len(v) for s, v in splits.items()}
        assert abs(sizes["test"] / len(cat) - 0.15) < 0.05 and abs(sizes["val"] / len(cat) - 0.15) < 0.05
        for idx in splits.values():
            assert set(cat.labels[idx]) == {0, 1, 2}


def test_val_carved_from_a_given_train_split_keeps_groups_whole(tmp_path):
    manifest = grouped_manifest(tmp_path, with_split=lambda k, g: "test" if int(g[1:]) % 5 == 0 else "train")
    cat = scan(str(manifest))
    splits = assign_splits(cat, 0)
    assert len(splits["val"]) > 0 and broken_groups(cat, splits) == {}


def test_a_class_in_too_few_groups_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label,group\n" + "".join(f"{i}.png,{'a' if i < 20 else 'b'},{'p1' if i >= 20 else i}\n"
                                                   for i in range(24)))
    with pytest.raises(FeaturepipeError, match="class 'b' occurs in 1 group"):
        assign_splits(scan(str(path)), 0)


def test_kfold_keeps_each_group_in_one_fold(tmp_path):
    manifest = grouped_manifest(tmp_path)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    group_of = {row["path"]: row["group"] for row in rows}
    images, _ = make_arrays(len(rows) // 3 + 1, size=28)
    (tmp_path / "img").mkdir()
    for row, img in zip(rows, images):
        Image.fromarray(img).save(tmp_path / row["path"])
    run = tmp_path / "run"
    cli("train-cnn", "--data", manifest, "--out", run, "--folds", "3", "--epochs", "1")
    held_out = []
    for k in (1, 2, 3):
        with open(run / "folds" / f"fold{k}" / "cnn" / "val_predictions.csv", newline="", encoding="utf-8") as f:
            held_out.append({group_of[row["id"]] for row in csv.DictReader(f)})
    assert all(not held_out[a] & held_out[b] for a in range(3) for b in range(a + 1, 3))
    assert cli("train-cnn", "--data", manifest, "--out", tmp_path / "many", "--folds", "60", "--epochs", "1",
               ok=False).output.strip().endswith("use fewer folds")


# ---- CSV manifests ---------------------------------------------------------------------------------------------------

def _manifest(tmp_path: Path, extra: list[str], name: str = "m.csv", encoding: str = "utf-8") -> Path:
    files = write_images(tmp_path / "d" / "images", 5, size=28)
    rows = [f"{p.relative_to(tmp_path / 'd').as_posix()},{label}" for p, label in files] + extra
    path = tmp_path / "d" / name
    path.write_bytes(("path,label\n" + "\n".join(rows) + "\n").encode(encoding))
    return path


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


@pytest.mark.parametrize("row", ["../outside/secret.png", "/etc/passwd", "images/../../outside/secret.png"])
def test_csv_rows_outside_the_manifest_folder_are_refused(tmp_path, row):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(make_arrays(1, size=28)[0][0]).save(outside / "secret.png")
    m = _manifest(tmp_path, [f"{row},bar"])
    line = refused(cli("train-cnn", "--data", m, "--out", tmp_path / "r", ok=False), f"{m}:17", row,
                   "--allow-outside")
    assert "outside" in line
    if row != "/etc/passwd":
        r = cli("data", "inspect", "--data", m, "--allow-outside")
        assert "16 images" in r.output


def test_a_link_inside_the_manifest_folder_that_leads_out_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(make_arrays(1, size=28)[0][0]).save(outside / "private.png")
    m = _manifest(tmp_path, ["images/esc/private.png,bar", "images/inner/" + "bar,bar"])
    (tmp_path / "d" / "images" / "esc").symlink_to(outside)
    # A link that stays inside the folder is only another name for a file there.
    (tmp_path / "d" / "images" / "inner").symlink_to(tmp_path / "d" / "images")
    m.write_text(m.read_text().replace("images/inner/bar,bar", "images/inner/" +
                                       next((tmp_path / "d" / "images" / "bar").iterdir()).name + ",bar"))
    m.write_text(m.read_text().replace("images/inner/", "images/inner/bar/"))
    first = next((tmp_path / "d" / "images" / "bar").iterdir()).name
    m.write_text(m.read_text().replace(f"images/bar/{first},bar\n", ""))  # one row for the file, through the link
    line = refused(cli("data", "inspect", "--data", m, ok=False), f"{m}:16", "images/esc/private.png",
                   "--allow-outside")
    assert str(outside / "private.png") in line and "link" in line
    cli("data", "inspect", "--data", m, "--allow-outside")
    m.write_text("".join(ln for ln in m.read_text().splitlines(True) if "esc/" not in ln))
    assert len(scan(str(m))) == 15


def test_csv_with_a_nul_byte_or_an_overlong_field_names_the_row(tmp_path):
    m = _manifest(tmp_path, ["images/bar/x\0y.png,bar"])
    refused(cli("data", "inspect", "--data", m, ok=False), f"{m}:17", "NUL")
    m = _manifest(tmp_path, ["images/bar/" + "x" * 200_000 + ".png,bar"], name="long.csv")
    refused(cli("data", "inspect", "--data", m, ok=False), f"{m}:17", "field larger than field limit")


def test_csv_deleted_files_are_skipped_not_a_traceback(tmp_path):
    m = _manifest(tmp_path, [])
    gone = sorted((tmp_path / "d" / "images" / "bar").iterdir())[0]
    gone.unlink()
    run = tmp_path / "r"
    cli("train-cnn", "--data", m, "--out", run, "--epochs", "1")
    assert "file not found" in (run / "skipped.csv").read_text()


def test_csv_not_utf8_is_refused(tmp_path):
    m = _manifest(tmp_path, ["images/bar/caf\u00e9.png,bar"], encoding="latin-1")
    refused(cli("data", "inspect", "--data", m, ok=False), str(m), "UTF-8")


@pytest.mark.parametrize("spelling", ["./images/{}", "images/{}", "images//{}", "images/./{}"])
def test_csv_same_file_under_two_spellings_is_refused(tmp_path, spelling):
    first = write_images(tmp_path / "d" / "images", 5, size=28)[0]
    m = _manifest(tmp_path, [f"{spelling.format(first[0].relative_to(tmp_path / 'd' / 'images').as_posix())},{first[1]}"])
    refused(cli("data", "inspect", "--data", m, ok=False), "listed more than once", "row 2")


# ---- folders and links ----

def test_folder_links_out_of_the_data_are_refused_and_links_inside_work(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_images(data, 5, size=28)
    write_images(elsewhere, 2, size=28, seed=1)
    bar = data / "bar"
    # Inside: a link to a file of the folder no class holds, and a class folder that is a link to a folder inside.
    (tmp_path / "data" / ".store").mkdir()
    Image.fromarray(make_arrays(1, size=28)[0][0]).save(data / ".store" / "extra.png")
    (bar / "again.png").symlink_to(data / ".store" / "extra.png")
    (data / "column").rename(data / ".store" / "column")
    (data / "column").symlink_to(data / ".store" / "column")
    assert len(scan(str(data))) == 16
    for link, target in ((data / "d", elsewhere / "dot"), (bar / "private.png", next((elsewhere / "bar").iterdir())),
                         (bar / "passwd.png", Path("/etc/passwd"))):
        link.symlink_to(target)
        line = refused(cli("data", "inspect", "--data", data, ok=False), str(data), "outside the data folder",
                       "--allow-outside")
        assert str(target.resolve()) in line
        assert "passwd" not in line or "passwd.png" in line
        link.unlink()
    (data / "d").symlink_to(elsewhere / "dot")
    assert "d" in scan(str(data), allow_outside=True).class_names


@pytest.mark.parametrize("link, target", [("d", "."), ("d", "bar"), ("column/twin.png", "bar/{first}"),
                                          ("bar/twin.png", "bar/{first}")])
def test_an_image_reached_twice_through_a_link_is_refused(tmp_path, link, target):
    data = tmp_path / "data"
    write_images(data, 5, size=28)
    first = sorted((data / "bar").iterdir())[0].name
    (data / link).symlink_to(data / target.format(first=first))
    twice = f"bar/{first}" if target != "." else f"d/bar/{first}"
    for allow in ([], ["--allow-outside"]):
        line = refused(cli("data", "inspect", "--data", data, *allow, ok=False), str(data), "through a link",
                       "remove the link")
        assert twice in line


def test_a_csv_row_reaching_another_row_s_file_through_a_link_is_refused(tmp_path):
    m = _manifest(tmp_path, [])
    first = sorted((tmp_path / "d" / "images" / "bar").iterdir())[0].name
    (tmp_path / "d" / "images" / "alias").symlink_to(tmp_path / "d" / "images" / "bar")
    m.write_text(m.read_text() + f"images/alias/{first},column\n")
    refused(cli("data", "inspect", "--data", m, ok=False), f"{m}:17", f"images/alias/{first}", "through a link")


def test_a_hidden_folder_beside_the_classes_is_named_where_its_images_are_left_out(tmp_path):
    data = tmp_path / "data"
    write_images(data, 4, size=28)
    write_images(data / "...", 3, size=28, seed=1)
    r = cli("data", "inspect", "--data", data)
    assert len(scan(str(data))) == 12
    said = " ".join(r.output.split())
    assert "warning" in said and str(data / "...") in said and "9 image(s) that are left out" in said
    shutil.rmtree(data / "...")
    (data / ".store").mkdir()  # only the targets of a class link: used, so no warning
    (data / "bar").rename(data / ".store" / "bar")
    (data / "bar").symlink_to(data / ".store" / "bar")
    assert "warning" not in cli("data", "inspect", "--data", data).output


# ---- .npz ------------------------------------------------------------------------------------------------------------

def _npz(path: Path, **override) -> Path:
    arrays = {}
    for seed, split, n in [(0, "train", 8), (1, "val", 3), (2, "test", 3)]:
        x, y = make_arrays(n, seed=seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_npz_keeps_official_split(npz_file):
    cat = scan(str(npz_file))
    splits = assign_splits(cat, 0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 120, "val": 30, "test": 36}
    assert cat.class_names == ["0", "1", "2"]
    assert cat.ids[splits["test"][0]] == "test/000000"


def test_npz_nan_pixel_does_not_blank_every_image(tmp_path):
    x = make_arrays(8)[0].astype(np.float32)
    x[0, 0, 0] = np.nan
    catalog = scan(str(_npz(tmp_path / "n.npz", train_images=x)))
    images = catalog.store.images
    assert all(images[i].std() > 0 for i in range(len(images)))


@pytest.mark.parametrize("name, value, words", [
    ("train_labels", np.array([0.7, 1.7] * 12), ["train_labels", "0.7", "whole numbers"]),
    ("train_labels", -np.ones(24, dtype=int), ["train_labels", "-1"]),
    ("train_labels", np.array(["a", "b", "c"] * 8), ["train_labels", "class indices"]),
    ("test_images", np.zeros((9, 32, 32), np.uint8), ["test_images", "same image shape"]),
    ("class_names", np.array(["a", "b"]), ["class_names", "one distinct name per label"]),
])
def test_npz_bad_arrays_are_refused(tmp_path, name, value, words):
    path = _npz(tmp_path / "b.npz", **{name: value})
    refused(cli("data", "inspect", "--data", path, ok=False), str(path), *words)


def test_class_names_that_differ_from_the_npz_s_own_are_refused(tmp_path):
    path = _npz(tmp_path / "named.npz", class_names=np.array(["x", "y", "z"]))
    refused(cli("train-cnn", "--data", path, "--out", tmp_path / "r", "--class-names", "p,q,r", ok=False),
            "--class-names p,q,r", str(path), "x, y, z")
    assert not (tmp_path / "r" / "config.json").exists()
    assert scan(str(path)).class_names == ["x", "y", "z"]


def _forged_npz(path: Path, shape: tuple[int, ...], data: bytes) -> Path:
    """An .npz whose train_images header declares `shape` uint8 and holds `data` after it."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.save(labels, np.zeros(shape[0] if shape[0] < 10 else 3, np.int64))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_images.npy", header.getvalue() + data)
        z.writestr("train_labels.npy", labels.getvalue())
    return path


def test_an_npz_bomb_is_refused_from_its_headers_before_any_data_is_read(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("np.load ran")

    forged = _forged_npz(tmp_path / "forged.npz", (100000, 128, 128), bytes(1 << 20))
    big = _forged_npz(tmp_path / "big.npz", (8, 512, 512), bytes(8 * 512 * 512))
    monkeypatch.setattr(np, "load", no_loading)
    refused(cli("data", "inspect", "--data", forged, ok=False), str(forged), "train_images", "(100000, 128, 128)",
            "1.53 GiB", "holds")
    from featurepipe.data import sources

    monkeypatch.setattr(sources, "available_memory", lambda: 3 << 20)
    refused(cli("data", "inspect", "--data", big, ok=False), str(big), "half the memory free", "image folder")


def test_a_text_file_named_npz_is_said_to_be_no_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("just some notes\n")
    line = refused(cli("data", "inspect", "--data", path, ok=False), str(path), "not an .npz (zip) file")
    assert "pickle" not in line


def test_npz_object_arrays_are_refused_unloaded(tmp_path):
    path = _npz(tmp_path / "o.npz", train_labels=np.array([0, 1, 2] * 7 + [None, 1, 2], dtype=object))
    line = refused(cli("data", "inspect", "--data", path, ok=False), str(path), "train_labels", "object array")
    assert "unsafe" not in line and "allow_pickle" not in line
