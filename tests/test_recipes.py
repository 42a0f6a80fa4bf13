"""docs/recipes.md stays true: each recipe's commands run on a tiny replica of its data layout."""

import csv
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import cli, write_images

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def blocks() -> dict[str, str]:
    """Recipe title → its bash block."""
    text = RECIPES.read_text()
    out = {}
    for section in text.split("\n## ")[1:]:
        title = section.splitlines()[0]
        match = re.search(r"```bash\n(.*?)```", section, re.S)
        out[title.split(" (")[0]] = match.group(1)
    return out


def _rename_classes(root: Path, names: list[str]) -> None:
    for old, new in zip(sorted(p for p in root.iterdir() if p.is_dir()), names):
        old.rename(root / new)


def kvasir(tmp: Path) -> Path:
    root = tmp / "kvasir-dataset-v2"
    write_images(root, 6, rgb=True, ext=".jpg")
    _rename_classes(root, ["dyed-lifted-polyps", "esophagitis", "polyps"])
    return root


def capsule(tmp: Path) -> Path:
    root = tmp / "kvasir-capsule"
    files = write_images(root / "images", 6, rgb=True, ext=".jpg")
    files[0][0].write_bytes(b"")  # the zero-byte files of the real set
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for path, label in files:
            w.writerow([path.relative_to(root).as_posix(), f"Capsule {label}"])
    return root


def fitzpatrick(tmp: Path) -> Path:
    root = tmp / "fitzpatrick17k"
    files = write_images(root / "raw", 6, rgb=True, ext=".jpg")
    (root / "images").mkdir()
    with (root / "fitzpatrick17k.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["md5hash", "fitzpatrick_scale", "label", "url"])
        for i, (path, label) in enumerate(files):
            digest = f"{i:032x}"
            path.rename(root / "images" / f"{digest}.jpg")
            w.writerow([digest, 3, f"skin, {label}", "http://example.invalid"])
    return root


def chest_xray(tmp: Path) -> Path:
    root = tmp / "chest_xray"
    for seed, split, n in [(0, "train", 8), (1, "val", 2), (2, "test", 3)]:
        write_images(root / split, n, seed=seed, ext=".jpeg")
        _rename_classes(root / split, ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"])
    return root


def covid(tmp: Path) -> Path:
    root = tmp / "covid19"
    for seed, split, n in [(0, "train", 10), (1, "test", 3)]:
        write_images(root / split, n, seed=seed, ext=".png")
        _rename_classes(root / split, ["Covid", "Normal", "Viral Pneumonia"])
    return root


REPLICAS = {"Kvasir v2": kvasir, "Kvasir-Capsule": capsule, "Fitzpatrick17k": fitzpatrick,
            "Chest X-Ray Pneumonia": chest_xray, "COVID-19 X-ray": covid}


def test_every_recipe_has_a_replica():
    assert set(blocks()) == set(REPLICAS)


@pytest.mark.parametrize("name", list(REPLICAS))
def test_recipe_runs_on_a_replica(name, tmp_path, monkeypatch):
    data = REPLICAS[name](tmp_path)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "DATA": str(data)}
    for line in blocks()[name].strip().splitlines():
        if line.startswith("DATA="):
            continue
        if line.startswith("featurepipe "):
            # In-process (importing torch once, not once per command); quick settings for training.
            args = shlex.split(line.replace('"$DATA', f'"{data}'))[1:]
            if args[0] == "train-cnn":
                args += ["--epochs", "1", "--img-size", "28"]
            cli(*args)
        else:
            result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "artifacts").iterdir())
    assert (run / "compare" / "summary.json").is_file()
