"""torchrun with 2 CPU processes (Gloo): the same commands, PyTorch's own DistributedDataParallel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import prediction_file, read_predictions

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "featurepipe", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_process_training_writes_one_complete_run(npz_file, tmp_path):
    torchrun("train-cnn", "--data", str(npz_file), "--out", "run", "--epochs", "2", cwd=tmp_path)
    run = tmp_path / "run"
    metrics = json.loads((run / "cnn" / "metrics.json").read_text())
    names = json.loads((run / "config.json").read_text())["data"]["class_names"]
    _, y, proba = read_predictions(prediction_file(run, "cnn"), names)
    # Rank 0 scored the whole test split, not its own shard of it.
    assert len(y) == sum(json.loads((run / "config.json").read_text())["data"]["counts"]["test"])
    assert metrics["epochs_run"] == 2 and metrics["test"]["accuracy"] == pytest.approx((proba.argmax(1) == y).mean())
    assert len((run / "cnn" / "history.csv").read_text().splitlines()) == 1 + 2  # rank 0 alone wrote it
    assert not list(run.rglob("*.tmp"))
    torch.load(run / "cnn" / "model.pt", weights_only=True)  # a complete checkpoint


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_process_extract_equals_one_process(tiny_run, tmp_path):
    import h5py
    import numpy as np

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with h5py.File(run / "features.h5") as h5:
        single = {s: (h5[s]["features"][:], h5[s]["labels"][:], list(h5[s]["ids"].asstr()[:]))
                  for s in ("train", "val", "test")}
    (run / "features.h5").unlink()
    torchrun("extract", "--run-dir", "run", "--batch-size", "7", cwd=tmp_path)  # 7: shards end unevenly
    with h5py.File(run / "features.h5") as h5:
        for split, (features, labels, ids) in single.items():
            np.testing.assert_allclose(h5[split]["features"][:], features, rtol=1e-5, atol=1e-6)
            assert (h5[split]["labels"][:] == labels).all() and list(h5[split]["ids"].asstr()[:]) == ids
    assert not (run / "features.h5.partial").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_process_extract_skips_the_same_unreadable_images(tiny_run, tmp_path):
    import h5py
    import numpy as np
    from conftest import cli, make_arrays
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with h5py.File(run / "features.h5") as h5:
        names = json.loads(h5.attrs["class_names"])
    folder = tmp_path / "other"
    for seed, split in enumerate(("train", "val", "test")):
        images, labels = make_arrays(5, seed=seed)
        for i, (img, y) in enumerate(zip(images, labels)):
            (folder / split / names[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / split / names[y] / f"{i:02d}.png")
    broken = sorted(folder.rglob("*.png"))[::6]  # a few in every split, on both ranks' shards
    for f in broken:
        f.write_bytes(b"not an image")

    cli("extract", "--run", run, "--data", folder, "--out", tmp_path / "one.h5", "--batch-size", "4")
    torchrun("extract", "--run-dir", "run", "--data", "other", "--out", "two.h5", "--batch-size", "4", cwd=tmp_path)
    assert (tmp_path / "one.skipped.csv").read_text() == (tmp_path / "two.skipped.csv").read_text()
    assert (tmp_path / "two.skipped.csv").read_text().count("\n") == 1 + len(broken)
    with h5py.File(tmp_path / "one.h5") as one, h5py.File(tmp_path / "two.h5") as two:
        for split in ("train", "val", "test"):
            ids = list(two[split]["ids"].asstr()[:])
            assert ids == list(one[split]["ids"].asstr()[:]) and len(ids) == len(two[split]["features"])
            assert not {str(f.relative_to(folder)) for f in broken} & set(ids)
            np.testing.assert_allclose(two[split]["features"][:], one[split]["features"][:], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(two[split]["labels"][:], one[split]["labels"][:])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, cwd: Path) -> None:
    """`featurepipe ARGS` under torchrun as two "nodes" of one process each: two launchers, node ranks 0 and 1,
    meeting at a rendezvous on the loopback address over Gloo, as two machines sharing a folder would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "featurepipe", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_nodes_train_and_extract_the_features_one_process_extracts(npz_file, tmp_path):
    """Issue 33: multi-node torchrun, two launchers over 127.0.0.1 (a machine's two "nodes")."""
    import h5py
    import numpy as np

    from conftest import cli

    two_nodes("train-cnn", "--data", str(npz_file), "--out", "run", "--epochs", "1", "--batch-size", "16", cwd=tmp_path)
    run = tmp_path / "run"
    assert json.loads((run / "cnn" / "metrics.json").read_text())["epochs_run"] == 1
    two_nodes("extract", "--run-dir", "run", "--batch-size", "7", cwd=tmp_path)
    (run / "features.h5").rename(tmp_path / "two_nodes.h5")
    cli("extract", "--run", run, "--batch-size", "7")
    with h5py.File(run / "features.h5") as one, h5py.File(tmp_path / "two_nodes.h5") as two:
        assert json.loads(one.attrs["class_names"]) == json.loads(two.attrs["class_names"])
        for split in ("train", "val", "test"):
            assert list(two[split]["ids"].asstr()[:]) == list(one[split]["ids"].asstr()[:])
            np.testing.assert_array_equal(two[split]["labels"][:], one[split]["labels"][:])
            # Equal but for the last bits of rows that went through a batch of another size (the shards'
            # uneven ends): a forward pass's arithmetic depends on the batch's shape.
            np.testing.assert_allclose(two[split]["features"][:], one[split]["features"][:], rtol=1e-5, atol=1e-6)


DECODE_ON_EACH_RANK = """
import sys, numpy as np, torch.distributed as dist
from featurepipe.data import scan
from featurepipe.data.load import decode_all
from featurepipe.errors import FeaturepipeError
dist.init_process_group("gloo")
cat = scan(sys.argv[1])
images, failed = decode_all(cat.store, np.arange(len(cat)), 24, 1)
np.savez(f"rank{dist.get_rank()}.npz", images=images.images, failed=sorted(failed),
         shared=isinstance(images.images, np.memmap))
try:
    decode_all(cat.store, np.arange(len(cat)), 24, 1, stop_at_first=True)
except FeaturepipeError as e:
    open(f"rank{dist.get_rank()}.error", "w").write(str(e))
dist.destroy_process_group()  # exiting inside the group aborts now and then (Gloo's threads)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_processes_of_one_machine_decode_a_share_each_and_all_see_every_image(class_folders, tmp_path):
    import numpy as np

    from featurepipe.data import scan
    from featurepipe.data.load import decode_all

    broken = sorted(class_folders.rglob("*.png"))[1::7]  # on both ranks' shares
    for f in broken:
        f.write_bytes(b"not an image")
    cat = scan(str(class_folders))
    single, failed = decode_all(cat.store, np.arange(len(cat)), 24, 1)
    assert len(failed) == len(broken)
    with pytest.raises(Exception) as first:
        decode_all(cat.store, np.arange(len(cat)), 24, 1, stop_at_first=True)

    (tmp_path / "decode.py").write_text(DECODE_ON_EACH_RANK)
    shm = set(Path("/dev/shm").glob("featurepipe-*")) if Path("/dev/shm").is_dir() else set()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "decode.py", str(class_folders)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        mine = np.load(tmp_path / f"rank{rank}.npz")
        assert mine["shared"]  # one array both map, not a copy each
        np.testing.assert_array_equal(mine["images"], single.images)  # the other rank's share included
        assert list(mine["failed"]) == sorted(failed)
        assert (tmp_path / f"rank{rank}.error").read_text() == str(first.value)  # both stop at the same image
    if Path("/dev/shm").is_dir():
        assert set(Path("/dev/shm").glob("featurepipe-*")) == shm  # the shared file is gone


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_process_training_from_image_files_skips_each_unreadable_one_once(class_folders, tmp_path):
    broken = sorted(class_folders.rglob("*.png"))[::9]
    for f in broken:
        f.write_bytes(b"")
    torchrun("train-cnn", "--data", str(class_folders), "--out", "run", "--epochs", "2", cwd=tmp_path)
    skipped = (tmp_path / "run" / "skipped.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in skipped) == sorted(
        str(f.relative_to(class_folders)) for f in broken)
    assert json.loads((tmp_path / "run" / "cnn" / "metrics.json").read_text())["epochs_run"] == 2


def test_launch_is_read_from_torchruns_environment_and_a_plain_start_is_rank_0_of_1():
    from featurepipe.distributed import Launch

    assert Launch.from_environ({}) == Launch() and Launch().is_main
    second = Launch.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (second.rank, second.world_size, second.local_rank, second.local_world_size) == (1, 2, 1, 2)
    assert not second.is_main
