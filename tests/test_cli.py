"""How commands refuse: one line on stderr, exit code 2, no traceback; options out of range; commands out of order."""

import shutil
import subprocess
import sys

import pytest

from conftest import cli, refused, write_images


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


@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], ["--seed -1"]),
    (["--weight-decay", "-1"], ["--weight-decay -1"]),
    (["--lr", "inf"], ["--lr inf"]),
    (["--folds", "50"], ["--folds 50", "use fewer folds"]),
])
def test_train_options_out_of_range(tmp_path, class_folders, args, words):
    refused(cli("train-cnn", "--data", class_folders, "--out", tmp_path / "r", "--epochs", "1", *args, ok=False), *words)


@pytest.mark.parametrize("steps", ["0", "1"])
def test_lr_find_needs_two_steps(tmp_path, class_folders, steps):
    refused(cli("lr-find", "--data", class_folders, "--out", tmp_path / "lr", "--steps", steps, ok=False),
            f"--steps {steps}")


@pytest.mark.parametrize("command", ["extract", "fit-heads", "compare"])
def test_commands_out_of_order_are_refused_clearly(tmp_path, command):
    r = cli(command, "--run", tmp_path / "missing", ok=False)
    assert r.exit_code == 2
    assert "train-cnn" in r.output


def test_fit_heads_before_extract_is_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "features.h5").unlink()
    r = cli("fit-heads", "--run", run, ok=False)
    assert r.exit_code == 2 and "featurepipe extract" in r.output


def test_unknown_head_is_refused(tiny_run):
    r = cli("fit-heads", "--run", tiny_run, "--heads", "svm,xgboost", ok=False)
    assert r.exit_code == 2 and "xgboost" in r.output


def test_bad_input_gives_one_line_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "featurepipe", "train-cnn", "--data", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"featurepipe: error: --data {tmp_path / 'nope'}: no such file or folder; "
                     "give an image folder, a CSV, an .npz or 'demo'"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--img-size", "16", "too small"),
    ("--arch", "alexnet9", "--arch alexnet9: choose one of auto, sixblock"),
    ("--device", "tpu", "choose auto, cpu or cuda"),
    ("--augment", "heavy", "--augment heavy"),
])
def test_bad_options_are_refused(npz_file, tmp_path, option, value, message):
    r = cli("train-cnn", "--data", npz_file, "--out", tmp_path / "run", option, value, ok=False)
    assert r.exit_code == 2 and message in r.output


def test_cuda_asked_for_but_absent_is_refused(npz_file, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("train-cnn", "--data", npz_file, "--out", tmp_path / "run", "--device", "cuda", ok=False)
    assert r.exit_code == 2 and "CUDA is not available" in r.output
