"""`featurepipe data inspect`: what a user learns about a data source before training on it."""

import csv
import json
import shutil

from PIL import Image

from conftest import CLASSES, cli, write_images


def leaky_manifest(tmp_path):
    """A CSV with split and group columns: one patient in train and test, one image copied from train into
    test, one 16-bit scan, and one unreadable file."""
    files = write_images(tmp_path / "img", 8)
    rows = [[p.relative_to(tmp_path).as_posix(), label, "train" if k < 18 else "test", f"patient{k // 2}"]
            for k, (p, label) in enumerate(files)]
    rows[17][3] = rows[18][3] = "patient_both"  # the same patient on both sides of the split
    copied = tmp_path / "img" / "copy_of_first.png"
    shutil.copy(tmp_path / rows[0][0], copied)
    rows.append([copied.relative_to(tmp_path).as_posix(), rows[0][1], "test", "patient_copy"])
    rows[5][0] = rows[5][0].replace(".png", ".tif")
    Image.open(files[5][0]).convert("I;16").save(tmp_path / rows[5][0])
    (tmp_path / rows[6][0]).write_bytes(b"")
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        w.writerows(rows)
    return path, rows


def test_inspect_reports_counts_modes_unreadable_duplicates_and_broken_groups(tmp_path):
    manifest, rows = leaky_manifest(tmp_path)
    r = cli("data", "inspect", "--data", manifest, "--json", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 25 and report["class_names"] == sorted(CLASSES)
    # Counts are of the readable images in the split train-cnn would use (val carved out of the given train).
    assert sum(sum(c) for c in report["counts"].values()) == 24
    assert set(report["counts"]) == {"train", "val", "test"}
    assert report["modes"] == {"L": 23, "I;16": 1}
    assert report["width"] == {"min": 40, "median": 40, "max": 40}
    assert [(u["id"], u["reason"]) for u in report["unreadable"]] == [(rows[6][0], "empty file (0 bytes)")]
    assert len(report["duplicates"]) == 1
    dup = report["duplicates"][0]
    assert sorted(d.split(":", 1)[1] for d in dup) == sorted([rows[0][0], rows[-1][0]])
    assert any(d.startswith("test:") for d in dup)
    assert list(report["broken_groups"]) == ["patient_both"]
    assert report["problem"] is None
    for text in ("unreadable  1", rows[6][0], "1 image(s) in more than one split", "patient_both", "verdict     usable"):
        assert text in r.output


def test_inspect_exits_2_where_training_would_refuse_the_data(tmp_path):
    root = tmp_path / "data"
    write_images(root, 3)
    for f in (root / "dot").iterdir():
        f.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = cli("data", "inspect", "--data", root, ok=False)
    assert r.exit_code == 2
    assert "unreadable  3" in r.output and "verdict     cannot be used" in r.output
    assert r.output.rstrip().splitlines()[-1].startswith("featurepipe: error:")
    assert "class 'dot'" in r.output.rstrip().splitlines()[-1]


def test_inspect_of_an_unknown_source_is_one_line(tmp_path):
    r = cli("data", "inspect", "--data", tmp_path / "nope", ok=False)
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
