"""Every kind of bad input a user can give featurepipe, each through the real command line in a fresh
process (so exit codes and tracebacks are what a user sees), on tiny generated data. A case fails if the
command printed a Python traceback, died of something else than the signal the case sends, ran code
planted in a run folder (a PWNED_* file appeared), or failed the case's own expectation where it has one
(refused in one line, a user's file intact, a warning given: the cases of issue 22, whose failures were
quiet). Minutes in all, so marked slow: pytest -m slow tests/test_bad_inputs.py
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("a", "b", "c")


def images(root: Path, n: int = 10, size: int = 32, seed: int = 0, classes=CLASSES) -> list[Path]:
    """Class folders of grey noise images, each class a different brightness."""
    rng = np.random.default_rng(seed)
    out = []
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(60 + 60 * k, 20, (size, size)), 0, 255).astype(np.uint8)
            path = root / c / f"{seed}_{i:03d}.png"
            Image.fromarray(img).save(path)
            out.append(path)
    return out


def manifest(path: Path, rows: list[tuple[str, ...]], header: str = "path,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


class Planted:
    """Pickled, it runs code when loaded: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Cases:
    """Each method builds one bad input under `tmp` and returns (description, featurepipe arguments)."""

    def __init__(self, tmp: Path, run: Path) -> None:
        self.tmp, self.run = tmp, run
        self.limit = None  # a file-size limit (bytes) for the next case's command: a full disk
        self.env: dict[str, str] = {}  # environment variables for the next case's command
        self.expect = None  # for the next case: r -> "" if it held, else what went wrong

    def d(self, name: str) -> Path:
        return self.tmp / name

    def missing_path(self):
        return "--data path that does not exist", ["train-cnn", "--data", self.d("nope"), "--out", self.d("r")]

    def unknown_source(self):
        (self.d("notes.txt")).write_text("hello")
        return "--data a .txt file", ["train-cnn", "--data", self.d("notes.txt"), "--out", self.d("r")]

    def empty_class(self):
        images(self.d("empty_class"))
        (self.d("empty_class") / "d").mkdir()
        return "a class folder without images", ["train-cnn", "--data", self.d("empty_class"), "--out", self.d("r")]

    def single_class(self):
        images(self.d("single"), classes=("a",))
        return "one class only", ["train-cnn", "--data", self.d("single"), "--out", self.d("r")]

    def split_missing_class(self):
        images(self.d("tt") / "train")
        images(self.d("tt") / "test", seed=1, classes=("a", "b"))
        return "test/ lacks a class train/ has", ["train-cnn", "--data", self.d("tt"), "--out", self.d("r")]

    def csv_missing_column(self):
        files = images(self.d("csvm"))
        m = manifest(self.d("csvm.csv"), [(p.relative_to(self.tmp).as_posix(),) for p in files], header="path")
        return "CSV without a label column", ["train-cnn", "--data", m, "--out", self.d("r")]

    def csv_unknown_label(self):
        files = images(self.d("csvu"))
        rows = [(p.relative_to(self.tmp).as_posix(), "zebra" if k == 0 else p.parent.name) for k, p in enumerate(files)]
        m = manifest(self.d("csvu.csv"), rows)
        return ("CSV with a label the run does not know (extract --data)",
                ["extract", "--run", self.run, "--data", m, "--out", self.d("u.h5")])

    def csv_duplicate_row(self):
        files = images(self.d("csvd"))
        rows = [(p.relative_to(self.tmp).as_posix(), p.parent.name) for p in files]
        m = manifest(self.d("csvd.csv"), rows + rows[:1])
        return "CSV listing a file twice", ["train-cnn", "--data", m, "--out", self.d("r")]

    def csv_file_gone(self):
        files = images(self.d("csvg"))
        m = manifest(self.d("csvg.csv"), [(p.relative_to(self.tmp).as_posix(), p.parent.name) for p in files])
        files[0].unlink()
        files[15].unlink()
        return "CSV pointing at 2 files that no longer exist", ["train-cnn", "--data", m, "--out", self.d("r_gone"),
                                                                 "--epochs", "1"]

    def broken_images(self):
        root = self.d("broken")
        files = images(root)
        good = files[1].read_bytes()
        files[0].write_bytes(b"")
        files[11].write_bytes(good[: len(good) // 2])
        (root / "c" / "error_page.jpg").write_text("<html><body>404 Not Found</body></html>")
        (root / "b" / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
        return ("4 unreadable files: empty, truncated, HTML page as .jpg, Git LFS pointer as .png",
                ["train-cnn", "--data", root, "--out", self.d("r_broken"), "--epochs", "1"])

    def broken_images_error(self):
        root = self.d("broken_err")
        files = images(root)
        files[3].write_bytes(b"")
        return "an empty file with --on-bad-image error", ["train-cnn", "--data", root, "--out", self.d("r"),
                                                           "--on-bad-image", "error"]

    def class_all_broken(self):
        root = self.d("allbroken")
        for p in images(root):
            if p.parent.name == "c":
                p.write_bytes(b"\x89PNG\r\n\x1a\n")
        return "every image of one class unreadable", ["train-cnn", "--data", root, "--out", self.d("r")]

    def junk_files(self):
        root = self.d("junk")
        images(root)
        for rel in ["a/.DS_Store", "a/._0_000.png", "b/Thumbs.db", "c/desktop.ini", "notes.txt",
                    "__MACOSX/a/._0_001.png", "@eaDir/0_000.png/SYNOFILE_THUMB_M.png", ".ipynb_checkpoints/x.png"]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"\x00\x05junk")
        return (".DS_Store, ._ twins, Thumbs.db, desktop.ini, __MACOSX/, @eaDir/, .ipynb_checkpoints/",
                ["train-cnn", "--data", root, "--out", self.d("r_junk"), "--epochs", "1"])

    def odd_modes(self):
        root = self.d("modes")
        files = images(root)
        g = np.asarray(Image.open(files[0]))
        (files[0]).unlink()
        Image.fromarray(g.astype(np.uint16) * 257).save(root / "a" / "16bit.png")
        Image.fromarray(g.astype(np.float32) / 255).save(root / "a" / "float.tif")
        Image.fromarray(g.astype(np.int32) * 100).save(root / "a" / "int32.tif")
        Image.fromarray(g).convert("P").save(root / "b" / "palette.png")
        Image.fromarray(g).convert("CMYK").save(root / "b" / "cmyk.jpg")
        Image.fromarray(g).convert("RGBA").save(root / "c" / "rgba.png")
        Image.fromarray(g).convert("LA").save(root / "c" / "la.png")
        Image.fromarray(g).convert("1").save(root / "c" / "bilevel.bmp")
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(g))).save(root / "a" / "rotated.jpg", exif=exif)
        return ("16-bit PNG, float and int32 TIFF, palette, CMYK JPEG, RGBA, LA, 1-bit BMP, EXIF-rotated JPEG",
                ["train-cnn", "--data", root, "--out", self.d("r_modes"), "--epochs", "1"])

    def non_ascii(self):
        root = self.d("données")
        images(root, classes=("pneumonie", "正常", "ñ"))
        for p in list(root.rglob("*.png"))[:5]:
            p.rename(p.with_name(f"bild_ü_{p.name}"))
        return "non-ASCII folder and file names", ["train-cnn", "--data", root, "--out", self.d("r_ü"), "--epochs", "1"]

    def unknown_head(self):
        return "--heads xgboost", ["fit-heads", "--run", self.run, "--heads", "svm,xgboost"]

    def img_size_small(self):
        images(self.d("sz"))
        return "--img-size 16", ["train-cnn", "--data", self.d("sz"), "--out", self.d("r"), "--img-size", "16"]

    def img_size_arch(self):
        images(self.d("sz2"))
        return "--img-size 30 --arch convnext_tiny", ["train-cnn", "--data", self.d("sz2"), "--out", self.d("r"),
                                                      "--arch", "convnext_tiny", "--img-size", "30"]

    def other_data_resume(self):
        images(self.d("other"))
        return "--resume a run trained on another data set", ["train-cnn", "--data", self.d("other"), "--out",
                                                               self.run, "--resume"]

    def finished_run(self):
        return "train-cnn into a finished run", ["train-cnn", "--data", "demo", "--out", self.run]

    def stale_features(self):
        run = self.d("stale_run")
        shutil.copytree(self.run, run)
        import torch

        ckpt = torch.load(run / "cnn" / "model.pt", weights_only=True)
        ckpt["epoch"] += 1
        torch.save(ckpt, run / "cnn" / "model.pt")
        return "features.h5 from another checkpoint", ["fit-heads", "--run", run]

    def heads_before_extract(self):
        run = self.d("noextract_run")
        shutil.copytree(self.run, run)
        (run / "features.h5").unlink()
        return "fit-heads before extract", ["fit-heads", "--run", run]

    def no_cuda(self):
        return "--device cuda (no CUDA here)", ["extract", "--run", self.run, "--device", "cuda"]

    def bad_policy(self):
        return "--on-bad-image ignore", ["train-cnn", "--data", "demo", "--out", self.d("r"), "--on-bad-image", "ignore"]

    def group_too_few(self):
        files = images(self.d("grp"))
        rows = [(p.relative_to(self.tmp).as_posix(), p.parent.name, "p1" if p.parent.name == "c" else f"p{k}")
                for k, p in enumerate(files)]
        m = manifest(self.d("grp.csv"), rows, header="path,label,group")
        return "CSV groups: one class in a single patient", ["train-cnn", "--data", m, "--out", self.d("r")]

    def inspect_leaky(self):
        files = images(self.d("leak"))
        rows = [(p.relative_to(self.tmp).as_posix(), p.parent.name, "test" if k % 5 == 0 else "train", f"p{k // 3}")
                for k, p in enumerate(files)]
        copy = files[1].with_name("copy_of_0_001.png")  # files[1] is in train; its copy goes to test
        shutil.copy(files[1], copy)
        rows.append((copy.relative_to(self.tmp).as_posix(), files[1].parent.name, "test", "p98"))
        files[2].write_bytes(b"")
        m = manifest(self.d("leak.csv"), rows, header="path,label,split,group")
        return ("data inspect: train/test duplicate, patient in both splits, an empty file",
                ["data", "inspect", "--data", m])

    def inspect_unusable(self):
        root = self.d("unusable")
        for p in images(root):
            if p.parent.name == "b":
                p.write_bytes(b"")
        return "data inspect: every image of a class empty", ["data", "inspect", "--data", root]

    def killed_extract(self):
        run = self.d("killed_run")
        shutil.copytree(self.run, run)
        (run / "features.h5").unlink()
        return "extract killed (SIGKILL) mid-run, then re-run", ["extract", "--run", run, "--batch-size", "8"]

    # ---- issue 14: hostile and unlucky input ----

    def copy_run(self, name: str) -> Path:
        run = self.d(name)
        shutil.copytree(self.run, run)
        return run

    def planted_head(self):
        import joblib

        run = self.copy_run("planted_head_run")
        joblib.dump(Planted(self.d("PWNED_BY_HEAD")), run / "heads" / "logreg.joblib")
        return ("a code-running pickle planted as heads/logreg.joblib (its json copied from a real head)",
                ["predict", "--run", run, "--model", "logreg", self.tmp / "good" / "a"])

    def planted_resume_state(self):
        import torch

        run = self.copy_run("planted_resume_run")
        torch.save({"x": Planted(self.d("PWNED_BY_RESUME"))}, run / "cnn" / "last.pt")
        return ("a code-running pickle planted as cnn/last.pt", ["train-cnn", "--data", self.tmp / "good", "--out", run,
                                                                 "--epochs", "2", "--resume"])

    def csv_outside(self):
        files = images(self.d("csvo"), n=4)
        images(self.d("outside"), n=1, classes=("a",))
        rows = [(p.relative_to(self.d("csvo")).as_posix(), p.parent.name) for p in files]
        m = manifest(self.d("csvo") / "m.csv", rows + [("../outside/a/0_000.png", "a"), ("/etc/passwd", "b")])
        return "CSV rows ../outside/a/0_000.png and /etc/passwd", ["train-cnn", "--data", m, "--out", self.d("r")]

    def csv_not_utf8(self):
        files = images(self.d("csvl"), n=4)
        rows = "".join(f"{p.relative_to(self.tmp).as_posix()},{p.parent.name}\n" for p in files) + "caf\u00e9.png,a\n"
        m = self.d("latin1.csv")
        m.write_bytes(("path,label\n" + rows).encode("latin-1"))
        return "a latin-1 CSV", ["train-cnn", "--data", m, "--out", self.d("r")]

    def csv_two_spellings(self):
        files = images(self.d("csvs"), n=4)
        rows = [(p.relative_to(self.tmp).as_posix(), p.parent.name) for p in files]
        m = manifest(self.d("spell.csv"), rows + [("./" + rows[0][0], rows[0][1]), (rows[1][0].replace("/", "//"), "a")])
        return "CSV naming one file as a/1.png and ./a/1.png", ["train-cnn", "--data", m, "--out", self.d("r")]

    def decompression_bomb(self):
        root = self.d("bomb")
        images(root)
        small = root / "a" / "0_000.png"
        data = bytearray(small.read_bytes())
        data[16:24] = struct.pack(">II", 30000, 30000)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
        (root / "a" / "bomb.png").write_bytes(bytes(data))
        return "a 1 KB PNG whose header claims 30000x30000 pixels", ["data", "inspect", "--data", root]

    def formula_names(self):
        root = self.d("formula")
        images(root, n=3, classes=("=1+1",))
        (root / "=1+1" / "0_000.png").rename(root / "=1+1" / "=HYPERLINK(1).png")
        (root / "=1+1" / "@x.png").write_bytes(b"")
        out = self.d("formula.csv")
        return ("files =HYPERLINK(1).png and @x.png (empty) predicted into a CSV",
                ["predict", "--run", self.run, root, "--out", out])

    def locked_run(self):
        run = self.copy_run("locked_run")
        self.held = open(run / ".lock", "a")  # this script holds the lock while featurepipe runs
        fcntl.flock(self.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "fit-heads while another command holds the run", ["fit-heads", "--run", run, "--heads", "logreg"]

    def predict_over_model(self):
        return "predict --out RUN/cnn/model.pt --overwrite", ["predict", "--run", self.run, self.tmp / "good" / "a",
                                                              "--out", self.run / "cnn" / "model.pt", "--overwrite"]

    def predict_over_csv(self):
        (self.d("mine.csv")).write_text("my notes")
        return "predict --out an existing CSV", ["predict", "--run", self.run, self.tmp / "good" / "a", "--out",
                                                 self.d("mine.csv")]

    def extract_over_features(self):
        return "extract --data OTHER --out RUN/features.h5", ["extract", "--run", self.run, "--data",
                                                               self.tmp / "good", "--out", self.run / "features.h5"]

    def train_into_user_folder(self):
        (self.d("mine")).mkdir()
        (self.d("mine") / "config.json").write_text('{"mine": 1}')
        return "train-cnn --out a folder holding a user's config.json", ["train-cnn", "--data", self.tmp / "good",
                                                                          "--out", self.d("mine")]

    def out_inside_data(self):
        images(self.d("inside"))
        return "train-cnn --out inside --data", ["train-cnn", "--data", self.d("inside"), "--out",
                                                 self.d("inside") / "run"]

    def changed_data(self):
        data = self.d("changed_data")
        shutil.copytree(self.tmp / "good", data)
        run = self.copy_run("changed_run")
        config = json.loads((run / "config.json").read_text())
        config["data"]["source"] = str(data)
        (run / "config.json").write_text(json.dumps(config))
        (data / "a" / "0_000.png").rename(data / "b" / "moved.png")
        return "an image moved to another class after training", ["extract", "--run", run]

    def full_disk_extract(self):
        run = self.copy_run("full_run")
        (run / "features.h5").unlink()
        self.limit = 40_000
        return "extract with 40 KB of disk left (RLIMIT_FSIZE)", ["extract", "--run", run]

    def unfinished_run(self):
        run = self.copy_run("unfinished_run")
        (run / "cnn" / "metrics.json").unlink()
        return "extract on a run whose training was killed", ["extract", "--run", run]

    def resume_other_epochs(self):
        run = self.copy_run("resume_epochs_run")
        return "--resume with another --epochs", ["train-cnn", "--data", self.tmp / "good", "--out", run, "--epochs",
                                                  "5", "--resume"]

    def resume_without_config(self):
        run = self.copy_run("noconfig_run")
        (run / "config.json").unlink()
        return "--resume without config.json", ["train-cnn", "--data", self.tmp / "good", "--out", run, "--resume"]

    def damaged_splits(self):
        run = self.copy_run("damaged_splits_run")
        (run / "splits.json").write_text("[1, 2]")
        (run / "features.h5").unlink()
        return "splits.json holding a list", ["extract", "--run", run]

    def damaged_head_json(self):
        run = self.copy_run("damaged_head_run")
        (run / "heads" / "logreg.json").write_bytes(b"\xff\xfe{")
        return "a head json that is not UTF-8", ["predict", "--run", run, "--model", "logreg", self.tmp / "good" / "a"]

    def npz_fractional_labels(self):
        x = np.zeros((9, 8, 8), np.uint8)
        np.savez(self.d("frac.npz"), train_images=x, train_labels=np.arange(9) % 3 + 0.7, test_images=x,
                 test_labels=np.arange(9) % 3)
        return ".npz labels 0.7, 1.7, 2.7", ["data", "inspect", "--data", self.d("frac.npz")]

    def npz_object_array(self):
        x = np.zeros((3, 8, 8), np.uint8)
        np.savez(self.d("obj.npz"), train_images=x, train_labels=np.array([0, "a", None], dtype=object),
                 test_images=x, test_labels=np.arange(3))
        return ".npz with an object (pickled) array", ["data", "inspect", "--data", self.d("obj.npz")]

    def npz_mixed_sizes(self):
        np.savez(self.d("mixed.npz"), train_images=np.zeros((9, 8, 8), np.uint8), train_labels=np.arange(9) % 3,
                 test_images=np.zeros((9, 10, 10), np.uint8), test_labels=np.arange(9) % 3)
        return ".npz whose splits have other image sizes", ["data", "inspect", "--data", self.d("mixed.npz")]

    def npz_class_names(self):
        x = np.zeros((9, 8, 8), np.uint8)
        np.savez(self.d("names.npz"), train_images=x, train_labels=np.arange(9) % 3, test_images=x,
                 test_labels=np.arange(9) % 3, class_names=np.array(["a", "b"]))
        return ".npz with 2 class_names for 3 labels", ["data", "inspect", "--data", self.d("names.npz")]

    def seed_negative(self):
        return "--seed -1", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("r"), "--seed", "-1"]

    def weight_decay_negative(self):
        return "--weight-decay -1", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("r"), "--weight-decay",
                                     "-1"]

    def folds_50(self):
        return "--folds 50 on 30 images a class", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("r_f"),
                                                   "--folds", "50", "--epochs", "1"]

    def lr_find_one_step(self):
        return "lr-find --steps 1", ["lr-find", "--data", self.tmp / "good", "--out", self.d("lr"), "--steps", "1"]

    def inspect_json_dir(self):
        return "data inspect --json DIR", ["data", "inspect", "--data", self.tmp / "good", "--json", self.tmp]

    def out_below_file(self):
        (self.d("afile")).write_text("x")
        return "--out below a file", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("afile") / "run"]

    def lr_inf(self):
        return "--lr inf", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("r"), "--lr", "inf"]

    def diverged(self):
        return "--lr 1e30 (training diverges)", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("r_div"),
                                                 "--lr", "1e30", "--epochs", "2"]

    def split_run(self, name: str, counts: tuple[int, int, int], classes=CLASSES, drop: tuple[str, ...] = (),
                  heads: str | None = None) -> Path:
        """A run (1 epoch, extracted, `heads` fitted) on train/val/test folders of counts images a class,
        less the files `drop` names."""
        root, run = self.d(name), self.d(f"{name}_run")
        for seed, (split, n) in enumerate(zip(("train", "val", "test"), counts)):
            images(root / split, n=n, seed=seed, classes=classes)
        for rel in drop:
            (root / rel).unlink()
        stages = [["train-cnn", "--data", root, "--out", run, "--epochs", "1"], ["extract", "--run", run]]
        for args in stages + ([["fit-heads", "--run", run, "--heads", heads]] if heads else []):
            featurepipe(args, check=True)
        return run

    def heads_small_data(self):
        run = self.split_run("small", (2, 2, 2))
        return "knn, svm, hgb with --tune cv on 2 images a class", ["fit-heads", "--run", run, "--heads",
                                                                     "knn,svm,hgb", "--tune", "cv"]

    def mathtext_class(self):
        root, run = self.d("math"), self.d("math_run")
        images(root, classes=("$\\undefinedcmd{x}$", "b", "c"))
        for args in (["train-cnn", "--data", root, "--out", run, "--epochs", "1"], ["extract", "--run", run],
                     ["fit-heads", "--run", run, "--heads", "logreg"]):
            featurepipe(args, check=True)
        return "a class named $\\undefinedcmd{x}$ (mathtext)", ["compare", "--run", run, "--no-gradcam"]

    def predict_empty_image(self):
        root = self.d("pred_empty")
        images(root, n=3, classes=("x",))
        (root / "x" / "0_001.png").write_bytes(b"")
        return "predict on a folder with one 0-byte image", ["predict", "--run", self.run, root / "x", "--out",
                                                             self.d("pred_empty.csv")]

    def ctrl_c_train(self):
        root = self.d("ctrlc")
        images(root, n=150)
        return "Ctrl-C (SIGINT) during train-cnn, then --resume", ["train-cnn", "--data", root, "--out",
                                                                   self.d("r_ctrlc"), "--epochs", "3"]


    # ---- issue 22: links, bombs, a cache that must check, files that must not be replaced ----

    def refuse(self, *words: str) -> None:
        """The next case holds if it is refused in one line naming every word."""
        def expect(r):
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("featurepipe: error:")]
            if r.returncode != 2 or len(errors) != 1:
                return f"not refused in one line (exit {r.returncode})"
            missing = [w for w in words if w not in errors[0]]
            return f"the line does not name {', '.join(missing)}" if missing else ""
        self.expect = expect

    def says(self, *words: str, absent: tuple[str, ...] = ()) -> None:
        """The next case holds if it exits 0 and its output holds every word and none of `absent`."""
        def expect(r):
            out = r.stdout + r.stderr
            missing = [w for w in words if w not in out] + [f"no {w}" for w in absent if w in out]
            return f"exit {r.returncode}" if r.returncode else (f"missing {', '.join(missing)}" if missing else "")
        self.expect = expect

    def csv_link_out(self):
        root = self.d("csvlink")
        files = images(root / "img", n=4)
        images(self.d("private"), n=1, classes=("x",))
        (root / "img" / "esc").symlink_to(self.d("private") / "x")
        rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in files] + [("img/esc/0_000.png", "a")]
        self.refuse("img/esc/0_000.png", "--allow-outside", "link")
        return ("CSV row img/esc/0_000.png where img/esc is a link out of the CSV's folder",
                ["train-cnn", "--data", manifest(root / "m.csv", rows), "--out", self.d("r")])

    def folder_links_out(self):
        root = self.d("folderlink")
        images(root)
        images(self.d("elsewhere"), n=3, classes=("d",))
        (root / "d").symlink_to(self.d("elsewhere") / "d")
        (root / "b" / "passwd.png").symlink_to("/etc/passwd")
        self.refuse("outside the data folder", "--allow-outside")
        return ("class folder d -> /elsewhere and b/passwd.png -> /etc/passwd",
                ["train-cnn", "--data", root, "--out", self.d("r")])

    def npz_bomb(self):
        import io as _io
        import zipfile

        header = _io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (100000, 128, 128)})
        labels = _io.BytesIO()
        np.save(labels, np.arange(100000) % 3)
        with zipfile.ZipFile(self.d("bomb.npz"), "w", zipfile.ZIP_DEFLATED) as z:
            with z.open("train_images.npy", "w", force_zip64=True) as f:
                f.write(header.getvalue())
                for _ in range(100000 * 128 * 128 // (1 << 24)):  # zeros: 1.6 GB that deflate to ~1.6 MB
                    f.write(bytes(1 << 24))
                f.write(bytes(100000 * 128 * 128 % (1 << 24)))
            z.writestr("train_labels.npy", labels.getvalue())
            z.writestr("test_images.npy", header.getvalue())  # declares 1.6 GB, holds none
            z.writestr("test_labels.npy", labels.getvalue())
        self.refuse("bomb.npz", "test_images", "(100000, 128, 128)")
        return (f"a {self.d('bomb.npz').stat().st_size / 1e6:.1f} MB .npz declaring (100000, 128, 128) uint8 twice",
                ["data", "inspect", "--data", self.d("bomb.npz")])

    def npz_text_file(self):
        self.d("notes.npz").write_text("hello, not numpy\n")
        self.refuse("not an .npz (zip) file")
        return "a 16-byte text file named .npz", ["data", "inspect", "--data", self.d("notes.npz")]

    def cached_run(self, name: str, n: int = 10) -> tuple[Path, Path, dict[str, str]]:
        """A run trained through the disk cache (every split above its cap) on BMP images (a rewrite of
        other pixels keeps the byte size)."""
        root, run = self.d(f"{name}_data"), self.d(f"{name}_run")
        for p in images(root, n=n):
            Image.open(p).save(p.with_suffix(".bmp"))
            p.unlink()
        env = {"FEATUREPIPE_CACHE_DIR": str(self.d(f"{name}_cache")), "FEATUREPIPE_CACHE_BYTES": "1"}
        featurepipe(["train-cnn", "--data", root, "--out", run, "--epochs", "1"], check=True, env={**os.environ, **env})
        return root, run, env

    def cache_rewritten_in_place(self):
        root, run, self.env = self.cached_run("inplace")
        a, b = sorted((root / "a").iterdir())[:2]
        st = a.stat()
        with open(a, "r+b") as f:  # cp -p, rsync -t --inplace: other pixels, same size, mtime put back
            f.write(b.read_bytes())
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.says(absent=("reading decoded images",))
        return ("an image rewritten in place, same size, mtime restored, then extract (disk cache)",
                ["extract", "--run", run, "--overwrite"])

    def cache_damaged_row(self):
        root, run, self.env = self.cached_run("damaged", n=100)
        folder = next(p for p in Path(self.env["FEATUREPIPE_CACHE_DIR"]).iterdir() if p.is_dir())
        data = np.load(folder / "images.npy", mmap_mode="r+")
        data[7, :4] ^= 0xFF  # one row of 300: the opening sample checks 64
        data.flush()
        del data

        def expect(r):  # row 7 decoded from its file with a warning, or the whole cache passed over
            out = r.stdout + r.stderr
            held = "row 7" in out and "changed since it was written" in out or "reading decoded images" not in out
            return f"exit {r.returncode}" if r.returncode else "" if held else "the damaged row was served"
        self.expect = expect
        return "one damaged row of a 300-image disk cache, then extract", ["extract", "--run", run, "--overwrite"]

    def cache_dir_is_a_file(self):
        self.d("cachefile").write_text("not a folder")
        self.env = {"FEATUREPIPE_CACHE_DIR": str(self.d("cachefile")), "FEATUREPIPE_CACHE_BYTES": "1"}
        self.says("warning: no decode cache")
        return "FEATUREPIPE_CACHE_DIR is a file", ["train-cnn", "--data", self.tmp / "good", "--out", self.d("r_cf"),
                                                   "--epochs", "1"]

    def cache_key_is_a_link(self):
        root, run, self.env = self.cached_run("keylink")
        cache = Path(self.env["FEATUREPIPE_CACHE_DIR"])
        folder = next(p for p in cache.iterdir() if p.is_dir())
        shutil.rmtree(folder)
        (self.d("keylink_target")).mkdir()
        folder.symlink_to(self.d("keylink_target"))
        self.says("warning: no decode cache")
        return "the cache's key folder replaced by a symlink", ["train-cnn", "--data", root, "--out", run,
                                                                "--overwrite", "--epochs", "1"]

    def other_runs_head(self):
        import skops.io as sio
        from sklearn.linear_model import LogisticRegression

        run = self.copy_run("foreign_head_run")
        X = np.random.default_rng(1).normal(size=(30, 4))
        sio.dump(LogisticRegression().fit(X, np.arange(30) % 3), run / "heads" / "logreg.skops")
        self.refuse("logreg.skops", "sha256")
        return ("heads/logreg.skops copied from another run, its json left as it was",
                ["predict", "--run", run, "--model", "logreg", self.tmp / "good" / "a"])

    def head_other_width(self):
        import skops.io as sio
        from sklearn.linear_model import LogisticRegression

        run = self.copy_run("wide_head_run")
        X = np.random.default_rng(1).normal(size=(30, 7))
        sio.dump(LogisticRegression().fit(X, np.arange(30) % 5), run / "heads" / "logreg.skops")
        info = json.loads((run / "heads" / "logreg.json").read_text())
        info["skops_sha256"] = hashlib.sha256((run / "heads" / "logreg.skops").read_bytes()).hexdigest()
        (run / "heads" / "logreg.json").write_text(json.dumps(info))
        self.refuse("logreg.skops", "takes 7 features")
        return ("a head of 7 features and 5 classes, its json's hash forged to match",
                ["predict", "--run", run, "--model", "logreg", self.tmp / "good" / "a"])

    def planted_joblib_alone(self):
        import joblib

        run = self.copy_run("joblib_alone_run")
        joblib.dump(Planted(self.d("PWNED_BY_RF")), run / "heads" / "rf.joblib")
        shutil.copy(run / "heads" / "logreg.json", run / "heads" / "rf.json")
        self.refuse("--model rf", "fitted head: logreg")
        return ("heads/rf.joblib (a pickle) and rf.json without rf.skops",
                ["predict", "--run", run, "--model", "rf", self.tmp / "good" / "a"])

    def compare_out_user_files(self):
        mine = self.d("my_report")
        mine.mkdir()
        (mine / "summary.md").write_text("my notes")
        (mine / "metrics.csv").write_text("mine")
        self.refuse("my_report/", "already exists", "--overwrite")  # the first of the user's files it meets
        return "compare --out a folder holding a user's summary.md and metrics.csv", [
            "compare", "--run", self.run, "--out", mine, "--no-gradcam"]

    def extract_out_user_skipped(self):
        (self.d("mine.skipped.csv")).write_text("my list")
        self.refuse("mine.skipped.csv", "--overwrite")
        return "extract --out X.h5 beside a user's X.skipped.csv", [
            "extract", "--run", self.run, "--data", self.tmp / "good", "--out", self.d("mine.h5")]

    def predict_out_user_skipped(self):
        (self.d("pred.skipped.csv")).write_text("my list")
        self.refuse("pred.skipped.csv", "--overwrite")
        return "predict --out X.csv beside a user's X.skipped.csv", [
            "predict", "--run", self.run, self.tmp / "good" / "a", "--out", self.d("pred.csv")]

    # ---- issue 35 ----

    def skops_is_a_folder(self):
        run = self.copy_run("skops_dir_run")
        (run / "heads" / "logreg.skops").unlink()
        (run / "heads" / "logreg.skops").mkdir()
        self.refuse("logreg.skops", "a folder", "fit-heads")
        return ("heads/logreg.skops replaced by a folder",
                ["predict", "--run", run, "--model", "logreg", self.tmp / "good" / "a"])

    def extract_out_again(self):
        args = ["extract", "--run", self.run, "--data", self.tmp / "good", "--out", self.d("again.h5")]
        featurepipe(args, check=True)
        self.d("again.h5").unlink()
        self.says("again.h5")
        return "the same extract --out again after deleting its file", args

    def lock_is_a_folder(self):
        run = self.copy_run("lockdir_run")
        (run / ".lock").unlink(missing_ok=True)
        (run / ".lock").mkdir()
        self.refuse(".lock", "is a folder")
        return "RUN/.lock is a folder", ["fit-heads", "--run", run, "--heads", "logreg"]

    def csv_nul_byte(self):
        files = images(self.d("csvnul"), n=4)
        rows = [(p.relative_to(self.tmp).as_posix(), p.parent.name) for p in files] + [("csvnul/a/x\0y.png", "a")]
        self.refuse("nul.csv:14", "NUL")
        return "CSV path with a NUL byte", ["train-cnn", "--data", manifest(self.d("nul.csv"), rows), "--out",
                                            self.d("r")]

    def csv_long_field(self):
        files = images(self.d("csvlong"), n=4)
        rows = [(p.relative_to(self.tmp).as_posix(), p.parent.name) for p in files] + [("x" * 200_000, "a")]
        self.refuse("long.csv:14", "field larger than field limit")
        return "CSV field of 200 000 characters", ["train-cnn", "--data", manifest(self.d("long.csv"), rows), "--out",
                                                   self.d("r")]

    def max_pixels_bad(self):
        self.env = {"FEATUREPIPE_MAX_IMAGE_PIXELS": "1e9"}
        self.refuse("FEATUREPIPE_MAX_IMAGE_PIXELS=1e9")
        return "FEATUREPIPE_MAX_IMAGE_PIXELS=1e9", ["extract", "--run", self.run, "--data", self.tmp / "good",
                                                    "--out", self.d("px.h5")]

    def max_pixels_zero(self):
        self.env = {"FEATUREPIPE_MAX_IMAGE_PIXELS": "0"}
        self.refuse("FEATUREPIPE_MAX_IMAGE_PIXELS=0")
        return "FEATUREPIPE_MAX_IMAGE_PIXELS=0", ["data", "inspect", "--data", self.tmp / "good"]

    def stack_tiny(self):
        run = self.split_run("stack_small", (3, 1, 2))
        self.says("stack: skipped", absent=("--tune val",))
        return "fit-heads --heads logreg,stack on 1 val image a class", ["fit-heads", "--run", run, "--heads",
                                                                         "logreg,stack"]

    def three_test_images(self):
        run = self.split_run("three", (10, 3, 2), classes=("a", "b"), drop=("test/b/2_001.png",), heads="logreg")

        def expect(r):
            text = (run / "compare" / "summary.md").read_text() if r.returncode == 0 else ""
            if r.returncode or "RuntimeWarning" in r.stderr or "nan" in text.replace("nanmean", ""):
                return f"exit {r.returncode}, a RuntimeWarning or nan"
            return "" if "cannot be computed" in text else "summary.md does not say what cannot be computed"
        self.expect = expect
        return "compare on a 3-image test split (2 + 1)", ["compare", "--run", run, "--no-gradcam"]

    def many_classes(self):
        root, run = self.d("k1000"), self.d("k1000_run")
        names = tuple(f"c{k:04d}" for k in range(1000))
        for split, n in (("train", 2), ("val", 1), ("test", 1)):
            images(root / split, n=n, size=8, classes=names, seed={"train": 0, "val": 1, "test": 2}[split])
        for args in (["train-cnn", "--data", root, "--out", run, "--epochs", "1", "--img-size", "28"],
                     ["extract", "--run", run], ["fit-heads", "--run", run, "--heads", "logreg", "--tune", "none"]):
            featurepipe(args, check=True)
        self.says("best on test accuracy")
        return "compare on 1 000 classes", ["compare", "--run", run, "--no-gradcam", "--bootstrap", "1000"]

    def npz_named_by_option_extracted(self):
        data, run = self.d("greek.npz"), self.d("greek_run")
        x = np.random.default_rng(0).integers(0, 255, (12, 16, 16), dtype=np.uint8)
        np.savez(data, train_images=x, train_labels=np.arange(12) % 3, val_images=x[:6], val_labels=np.arange(6) % 3,
                 test_images=x[:6], test_labels=np.arange(6) % 3)
        featurepipe(["train-cnn", "--data", data, "--out", run, "--epochs", "1", "--class-names", "α,β,γ"], check=True)
        self.says("features of", "greek.h5")
        return ("extract --data the same .npz, trained with --class-names α,β,γ",
                ["extract", "--run", run, "--data", data, "--out", self.d("greek.h5")])

    def npz_class_names_overridden(self):
        x = np.zeros((9, 8, 8), np.uint8)
        np.savez(self.d("xyz.npz"), train_images=x, train_labels=np.arange(9) % 3, test_images=x,
                 test_labels=np.arange(9) % 3, class_names=np.array(["x", "y", "z"]))
        self.refuse("--class-names p,q,r", "xyz.npz", "x, y, z")
        return "--class-names p,q,r on an .npz whose class_names are x,y,z", [
            "train-cnn", "--data", self.d("xyz.npz"), "--out", self.d("r"), "--class-names", "p,q,r"]

    def class_folder_links_to_root(self):
        root = self.d("rootlink")
        images(root, n=4)
        (root / "d").symlink_to(root)
        self.refuse("rootlink", "d/a/0_000.png", "through a link", "remove the link")
        return "class folder d -> the data folder itself", ["train-cnn", "--data", root, "--out", self.d("r")]

    def csv_row_through_a_link(self):
        root = self.d("csvtwice")
        files = images(root / "img", n=4)
        (root / "img" / "alias").symlink_to(root / "img" / "a")
        rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in files] + [("img/alias/0_000.png", "b")]
        self.refuse("m.csv:14", "img/alias/0_000.png", "through a link")
        return "CSV row img/alias/0_000.png, img/alias -> img/a, whose 0_000.png is row 2", [
            "train-cnn", "--data", manifest(root / "m.csv", rows), "--out", self.d("r")]

    def class_folder_named_dots(self):
        root = self.d("dots")
        images(root, n=10)
        images(root / "...", n=3, classes=("d",))
        self.says("warning", "...", "3 image(s) that are left out")
        return "a class folder named '...'", ["train-cnn", "--data", root, "--out", self.d("dots_run"), "--epochs", "1"]

    def val_too_small_to_tell(self):
        root = self.d("two14")
        images(root, n=14, classes=("a", "b"))
        self.says("too few to tell", absent=("not clearly above", "has not learned"))
        return "2 classes of 14 images (4 val images)", ["train-cnn", "--data", root, "--out", self.d("two14_run"),
                                                         "--epochs", "2"]

    def shift_on_one_pool(self):
        root, run = self.d("pool"), self.d("pool_run")
        images(root, n=20)
        for args in (["train-cnn", "--data", root, "--out", run, "--epochs", "1"], ["extract", "--run", run],
                     ["fit-heads", "--run", run, "--heads", "logreg"]):
            featurepipe(args, check=True)

        def expect(r):
            text = (run / "compare" / "summary.md").read_text() if r.returncode == 0 else ""
            if r.returncode or "unlike val" in r.stderr + text or "scanner" in r.stderr:
                return f"exit {r.returncode} or a claim that test is unlike val"
            return "" if "Not checked" in text else "summary.md does not say the check does not apply"
        self.expect = expect
        return "compare on a run whose val and test featurepipe drew from one pool", [
            "compare", "--run", run, "--no-gradcam"]

    def predict_an_npz(self):
        np.savez(self.d("pred.npz"), train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.arange(3))
        self.refuse("pred.npz", "not an .npz or CSV source")
        return "predict given an .npz", ["predict", "--run", self.run, self.d("pred.npz")]


def _file_size_limit(nbytes: int) -> None:
    """In the child: writes past `nbytes` fail with EFBIG, as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def featurepipe(args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", os.environ)
    return subprocess.run([sys.executable, "-m", "featurepipe", *map(str, args)], capture_output=True, text=True, **kw)


def said(r) -> str:
    """The lines a user reads first: errors, warnings and what was trained on, else the last log line."""
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and "━" not in ln]
    firsts = ("featurepipe: error", "featurepipe: interrupted", "warning", "resuming", "verdict", "unreadable",
              "duplicates", "groups", "training ")
    picked = [ln for ln in lines if ln.startswith(firsts)]
    text = " / ".join(picked or lines[-1:])
    return text.replace("|", "\\|")[:400]


# Dies by SIGKILL (no cleanup at all, as in a crash or an OOM kill) in the middle of the third batch.
KILL_ON_THIRD_BATCH = """
import os, signal, sys
from featurepipe.models import Net
embed, calls = Net.embed, []
def dying(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return embed(self, *args, **kwargs)
Net.embed = dying
from featurepipe.cli import main
sys.argv = ["featurepipe", *sys.argv[1:]]
main()
"""


def ctrl_c_after(args, trigger: Path) -> subprocess.CompletedProcess:
    """SIGINT to the command's process group (as a terminal's Ctrl-C) once `trigger` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "featurepipe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not trigger.exists() and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


NOT_CASES = ("d", "copy_run", "refuse", "says", "cached_run", "split_run")
CASES = [m for m in vars(Cases) if not m.startswith("_") and m not in NOT_CASES]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Cases:
    tmp = tmp_path_factory.mktemp("bad")
    run = tmp / "good_run"
    images(tmp / "good", n=30)
    for args in (["train-cnn", "--data", tmp / "good", "--out", run, "--epochs", "2"], ["extract", "--run", run],
                 ["fit-heads", "--run", run, "--heads", "logreg"]):
        featurepipe(args, check=True)
    return Cases(tmp, run)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_held(cases, name):
    tmp = cases.tmp
    what, args = getattr(cases, name)()
    if name == "killed_extract":
        import h5py

        r1 = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_BATCH, *map(str, args)], capture_output=True,
                            text=True)
        final, partial = tmp / "killed_run" / "features.h5", tmp / "killed_run" / "features.h5.partial"
        with h5py.File(partial, "r") as h5:
            done = ", ".join(f"{s} {h5[s].attrs['done']}/{len(h5[s]['ids'])}" for s in ("train", "val", "test"))
        left = f"features.h5 {'EXISTS' if final.exists() else 'absent'}, features.h5.partial done {done}"
        r2 = featurepipe(args)
        did = f"killed: exit {r1.returncode}, {left}; re-run: {said(r2)}"
        crashed = "Traceback" in r1.stderr + r2.stderr or r1.returncode != -signal.SIGKILL
    elif name == "ctrl_c_train":
        r1 = ctrl_c_after(args, tmp / "r_ctrlc" / "cnn" / "last.pt")
        r2 = featurepipe([*args, "--resume"])
        did = f"Ctrl-C: exit {r1.returncode}, {said(r1)}; --resume: exit {r2.returncode}, {said(r2)}"
        crashed = "Traceback" in r1.stderr + r2.stderr or r1.returncode != 130
    else:
        limit, cases.limit = cases.limit, None
        env, cases.env = cases.env, {}
        r = featurepipe(args, preexec_fn=(lambda: _file_size_limit(limit)) if limit else None,
                        env={**os.environ, **env})
        did, crashed = said(r), "Traceback" in r.stderr + r.stdout or r.returncode < 0
        expect, cases.expect = cases.expect, None
        why = expect(r) if expect and not crashed else ""
        if why:
            did, crashed = f"NOT HELD ({why}); {did}", True
        ran = [m.name for m in tmp.glob("PWNED_*")]
        if ran:
            did, crashed = f"CODE RAN ({', '.join(ran)}); {did}", True
    assert not crashed, f"{what}: {did.replace(str(tmp) + '/', '')}"
