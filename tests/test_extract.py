"""extract: which features it writes (--layer, --tta, other sources, compression), equal to the model's own."""

import json

import h5py
import numpy as np
import pytest
import torch

from featurepipe.models import load_checkpoint

from conftest import cli


def test_extract_records_layer_and_tta_and_writes_those_features(tiny_run, tmp_path):
    out = tmp_path / "last2_flip.h5"
    source = json.loads((tiny_run / "config.json").read_text())["data"]["source"]
    cli("extract", "--run", tiny_run, "--data", source, "--out", out, "--layer", "last2", "--tta", "flip",
        "--device", "cpu")
    net, _ = load_checkpoint(tiny_run / "cnn" / "model.pt")
    from featurepipe.data import scan

    cat = scan(source)
    with h5py.File(out) as h5:
        assert h5.attrs["layer"] == "last2" and h5.attrs["tta"] == "flip"
        assert h5["train/features"].shape[1] == 448
        first_id = h5["test/ids"].asstr()[0]
        stored = h5["test/features"][0]
    x = torch.from_numpy(cat.store.read(cat.ids.index(first_id), 28, 1)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net.embed(x, "last2", "flip").numpy()[0]
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option,value", [("--layer", "first"), ("--tta", "rotate")])
def test_unknown_layer_or_tta_is_refused(tiny_run, tmp_path, option, value):
    r = cli("extract", "--run", tiny_run, "--data", "demo", "--out", tmp_path / "x.h5", option, value, ok=False)
    assert r.exit_code == 2 and f"{option} {value}: choose one of" in r.output


def test_features_match_the_models_own_embedding(tiny_run):
    import torch

    from featurepipe.data import scan
    from featurepipe.models import load_checkpoint

    net, _ = load_checkpoint(tiny_run / "cnn" / "model.pt")
    cat = scan(json.loads((tiny_run / "config.json").read_text())["data"]["source"])
    first = cat.ids.index("test/000000")
    x = torch.from_numpy(cat.store.read(first, 28, 1)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net.forward_features(x).numpy()[0]
    with h5py.File(tiny_run / "features.h5") as h5:
        np.testing.assert_allclose(h5["test/features"][0], expected, rtol=1e-4, atol=1e-5)


def test_extract_another_source_into_its_own_file(tiny_run, tmp_path, npz_file):
    out = tmp_path / "other.h5"
    cli("extract", "--run", tiny_run, "--data", npz_file, "--out", out)
    with h5py.File(out) as h5:
        assert h5["test/features"].shape == (36, 256)
        assert h5.attrs["source"] == str(npz_file)


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_features_read_back_the_same(tiny_run, tmp_path, compression):
    source = json.loads((tiny_run / "config.json").read_text())["data"]["source"]
    out = tmp_path / f"{compression}.h5"
    cli("extract", "--run", tiny_run, "--data", source, "--out", out, "--device", "cpu", "--compression", compression)
    with h5py.File(out) as packed, h5py.File(tiny_run / "features.h5") as plain:
        for split in ("train", "val", "test"):
            assert packed[split]["features"].compression == compression
            np.testing.assert_array_equal(packed[split]["features"][:], plain[split]["features"][:])
            np.testing.assert_array_equal(packed[split]["labels"][:], plain[split]["labels"][:])
    r = cli("extract", "--run", tiny_run, "--compression", "zip", ok=False)
    assert r.exit_code == 2 and "--compression zip: choose one of none, gzip, lzf" in r.output


def test_the_same_extract_runs_again_after_its_file_is_deleted(tiny_run, npz_file, tmp_path):
    """A header-only f.skipped.csv, written beside every f.h5, refused the re-run (issue 35, case 9)."""
    out = tmp_path / "f.h5"
    args = ["extract", "--run", tiny_run, "--data", npz_file, "--out", out, "--device", "cpu"]
    cli(*args)
    assert not out.with_name("f.skipped.csv").exists()  # nothing was skipped
    out.unlink()
    cli(*args)
    assert out.is_file()
    # A list of an earlier extract into the same name does not outlive what it described.
    out.with_name("f.skipped.csv").write_text("id,split,label,reason\nx,,,gone\n")
    cli(*args, "--overwrite")
    assert not out.with_name("f.skipped.csv").exists()


def test_an_npz_without_names_takes_the_names_the_run_gave_its_classes(tmp_path):
    from conftest import refused, write_npz

    data, run = write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    cli("train-cnn", "--data", data, "--out", run, "--epochs", 1, "--batch-size", 16, "--class-names", "α,β,γ")
    cli("extract", "--run", run, "--data", data, "--out", tmp_path / "same.h5", "--device", "cpu")
    with h5py.File(tmp_path / "same.h5") as h5:
        assert json.loads(h5.attrs["class_names"]) == ["α", "β", "γ"]
        assert h5["test/labels"][:].tolist() == np.load(data)["test_labels"].reshape(-1).tolist()
    arrays = dict(np.load(data))
    arrays["test_labels"] = arrays["test_labels"] + 3
    np.savez(tmp_path / "six.npz", **arrays)
    refused(cli("extract", "--run", run, "--data", tmp_path / "six.npz", "--out", tmp_path / "six.h5", ok=False),
            "six.npz", "labels go up to 5", "3 classes")
