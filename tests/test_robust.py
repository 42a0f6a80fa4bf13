"""Real-world data and failures: broken files, odd image modes, junk files, groups, refusals, interruptions."""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featurepipe.data import assign_splits, scan
from featurepipe.data.images import read_file
from featurepipe.data.load import decode_all
from featurepipe.data.sources import FileStore
from featurepipe.data.splits import broken_groups
from featurepipe.errors import FeaturepipeError

from conftest import CLASSES, cli, make_arrays, write_images

ROOT = Path(__file__).resolve().parents[1]

# exif_transpose's job, written independently with numpy: the array a viewer shows for each orientation.
ORIENTED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.T,
            6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, 1)}
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")


def grey_pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random grey pixels spanning exactly 0..255, so 16-bit and float scans stretch back to them."""
    g = np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)
    g.flat[0], g.flat[-1] = 0, 255
    return g


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


# ---- image modes, EXIF, junk files, non-ASCII names -------------------------------------------------------------

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


# ---- the bad-image policy ---------------------------------------------------------------------------------------

def messy_archive(root: Path) -> dict[str, str]:
    """train/val/test class folders with non-ASCII names, junk files, and broken images in every split.

    Returns {id: what is wrong} for the broken ones.
    """
    for seed, split, n in [(0, "train", 12), (1, "val", 4), (2, "test", 5)]:
        write_images(root / split, n, seed=seed)
    for split in ("train", "val", "test"):
        for f in sorted((root / split / "dot").glob("*.png"))[:2]:
            f.rename(f.with_name(f"pünktchen_{f.name}"))
        (root / split / "bar" / ".DS_Store").write_bytes(b"\x00junk")
        (root / split / "column" / "Thumbs.db").write_bytes(b"\x00junk")
    good = next((root / "train" / "bar").glob("*.png")).read_bytes()
    broken = {
        "train/bar/leer.png": b"",  # zero bytes, as in Kvasir-Capsule
        "train/column/abgebrochen.png": good[: len(good) // 2],  # truncated download
        "val/dot/fehlerseite.jpg": b"<html><body>404 Not Found</body></html>",  # an error page saved as an image
        "test/column/zufall.bmp": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
        "test/dot/kaputt_ü.png": good[:40] + b"\xff" * 20 + good[60:],  # header fine, pixel data broken
    }
    for rel, content in broken.items():
        (root / rel).write_bytes(content)
    return broken


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
    with open(run / "cnn" / "test_predictions.csv", newline="", encoding="utf-8") as f:
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
    with mock.patch("featurepipe.data.load.num_workers", return_value=0):
        images, failed = decode_all(FileStore(paths), np.arange(len(paths)), size, channels)
    assert 0 not in failed, failed.get(0)
    assert images.images.shape == (len(paths), size, size, channels) and images.images.dtype == np.uint8
    if expected is not None and expected.shape == (size, size):
        for c in range(channels):
            np.testing.assert_array_equal(images.images[0, :, :, c], expected)
    assert all(isinstance(why, str) and why for why in failed.values())


# ---- groups -----------------------------------------------------------------------------------------------------

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


# ---- refusals: one line, exit code 2 ----------------------------------------------------------------------------

def test_refusals_are_one_line_with_exit_code_2(tmp_path, tiny_run, split_folders):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    no_dot = tmp_path / "no_dot"
    shutil.copytree(split_folders, no_dot)
    shutil.rmtree(no_dot / "test" / "dot")
    unknown_label = tmp_path / "unknown.csv"
    files = write_images(tmp_path / "img", 4)
    unknown_label.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path).as_posix()},"
                                                      f"{'zebra' if k == 0 else ['0', '1', '2'][k % 3]}\n"
                                                      for k, (p, _) in enumerate(files)))
    all_empty = tmp_path / "all_empty"
    for p, _ in write_images(all_empty, 3):
        p.write_bytes(b"")
    twice = tmp_path / "twice.csv"
    twice.write_text("path,label\na.png,x\nb.png,y\na.png,x\n")
    cases = [
        (["train-cnn", "--data", notes, "--out", tmp_path / "r1"], "unknown data source"),
        (["train-cnn", "--data", no_dot, "--out", tmp_path / "r2"], "the test split has no image of class 'dot'"),
        (["extract", "--run", tiny_run, "--data", unknown_label, "--out", tmp_path / "u.h5"], "zebra"),
        (["train-cnn", "--data", twice, "--out", tmp_path / "r3"], "'a.png' is listed more than once"),
        (["train-cnn", "--data", all_empty, "--out", tmp_path / "r6"], "are unreadable; featurepipe data inspect says why"),
        (["train-cnn", "--data", split_folders, "--out", tmp_path / "r4", "--arch", "convnext_tiny", "--img-size", "30"],
         "convnext_tiny needs at least 32 px"),
        (["train-cnn", "--data", split_folders, "--out", tiny_run, "--resume"], "was trained on"),
        (["train-cnn", "--data", split_folders, "--out", tmp_path / "r5", "--on-bad-image", "ignore"],
         "--on-bad-image ignore: choose skip or error"),
    ]
    for args, message in cases:
        r = cli(*args, ok=False)
        assert r.exit_code == 2, (args, r.output)
        error = [line for line in r.output.splitlines() if line.startswith("featurepipe: error:")]
        assert len(error) == 1 and message in error[0], (args, r.output)
        assert "Traceback" not in r.output


# ---- interruptions ----------------------------------------------------------------------------------------------

KILL_ON_THIRD_BATCH = textwrap.dedent("""
    import os, signal, sys
    from featurepipe.models import Net
    embed, calls = Net.embed, []
    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as with a crash or an OOM kill
        return embed(self, *args, **kwargs)
    Net.embed = dying
    from featurepipe.cli import main
    sys.argv = ["featurepipe", *sys.argv[1:]]
    main()
""")


def _default_sigint() -> None:
    # A shell running a job in the background (CI can) makes it ignore SIGINT, and Python then installs
    # no KeyboardInterrupt handler; a terminal's Ctrl-C reaches a process that has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_killed_extract_leaves_no_complete_file_and_resumes_to_the_same_features(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    r = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_BATCH, "extract", "--run", str(run), "--batch-size", "16"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr

    # Nothing a later command would take for finished; the partial file says how far it got.
    assert not (run / "features.h5").exists()
    assert cli("fit-heads", "--run", run, ok=False).exit_code == 2
    with h5py.File(run / "features.h5.partial", "r") as h5:
        assert [int(h5[s].attrs["done"]) for s in ("train", "val", "test")] == [32, 0, 0]

    r = cli("extract", "--run", run, "--batch-size", "16")
    assert "resuming" in r.output
    assert not (run / "features.h5.partial").exists()
    with h5py.File(run / "features.h5") as resumed, h5py.File(tiny_run / "features.h5") as whole:
        assert dict(resumed.attrs) == dict(whole.attrs)
        for s in ("train", "val", "test"):
            assert "done" not in resumed[s].attrs
            np.testing.assert_array_equal(resumed[s]["features"][:], whole[s]["features"][:])
            np.testing.assert_array_equal(resumed[s]["labels"][:], whole[s]["labels"][:])
    cli("fit-heads", "--run", run, "--heads", "logreg")


def test_partial_file_of_another_checkpoint_is_not_resumed(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    with h5py.File(run / "features.h5.partial", "w") as h5:
        h5.attrs["checkpoint"] = "0123456789abcdef"
    r = cli("extract", "--run", run)
    assert "starting over" in r.output and "resuming" not in r.output
    with h5py.File(run / "features.h5") as new, h5py.File(tiny_run / "features.h5") as whole:
        np.testing.assert_allclose(new["test"]["features"][:], whole["test"]["features"][:], rtol=1e-5, atol=1e-6)


def test_ctrl_c_exits_cleanly_and_resume_finishes(tmp_path):
    data = tmp_path / "big.npz"
    arrays = {}
    for seed, split, n in [(0, "train", 60), (1, "val", 10), (2, "test", 10)]:
        x, y = make_arrays(n, seed=seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(data, **arrays)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "featurepipe", "train-cnn", "--data", str(data), "--out", str(run), "--epochs", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not (run / "cnn" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "featurepipe: interrupted" in err and "Traceback" not in err
    assert len((run / "cnn" / "history.csv").read_text().splitlines()) < 1 + 3  # stopped before the end
    cli("train-cnn", "--data", data, "--out", run, "--epochs", "3", "--resume")
    assert len((run / "cnn" / "history.csv").read_text().splitlines()) == 1 + 3


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
