"""Fingerprint what a run computed, leaving out what legitimately differs between two runs of the same
code (wall-clock times, dates, paths, library versions): the check a behaviour-preserving change
must pass.

    python -m scripts.checks.run_fingerprint RUN            # one line per artifact: sha256  name
    python -m scripts.checks.run_fingerprint RUN_A RUN_B    # the same for both, then same/DIFFERENT per line

A run made before a refactor and one made after, at the same seed on the same machine, must print
the same fingerprints: config.json (options and what they resolved to), CNN weights and buffers, features, every prediction file, the heads' fitted
parameters and scores, and compare's numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch

from featurepipe.runs import run_paths

# Keys whose values are times, dates, places or versions: not what the run computed. A .skops file's
# sha256 is one too: skops names its members after object ids and stamps them with the time, so two fits
# of the same head differ in bytes (its fitted arrays are fingerprinted instead, see _skops).
VOLATILE = {"created", "run", "environment", "timing", "figures", "checkpoint", "features", "time", "git", "versions",
            "skops_sha256"}


def _volatile(key: str) -> bool:
    return key in VOLATILE or "seconds" in key or key.endswith("_per_second")


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in sorted(obj.items()) if not _volatile(k)}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _json(path: Path) -> str:
    return _digest(json.dumps(_stable(json.loads(path.read_text())), sort_keys=True).encode())


def _csv_without_times(path: Path) -> str:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if not _volatile(name)] if rows else []
    return _digest("\n".join(",".join(r[i] for i in keep) for r in rows).encode())


def _weights(path: Path) -> str:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    return _digest(*(k.encode() + state[k].contiguous().numpy().tobytes() for k in sorted(state)))


def _skops(path: Path) -> str:
    """A fitted head's arrays, whatever their member names and times."""
    with zipfile.ZipFile(path) as z:
        return _digest(*sorted(z.read(n) for n in z.namelist() if n.endswith(".npy")))


def _features(path: Path) -> dict[str, str]:
    out = {}
    with h5py.File(path) as h5:
        for split in sorted(h5.keys()):
            for name in sorted(h5[split].keys()):
                arr = h5[split][name][:]
                out[f"{path.name}:{split}/{name}"] = _digest(np.ascontiguousarray(arr).tobytes()
                                                             if arr.dtype.kind != "O" else "\n".join(map(str, arr)).encode())
    return out


def fingerprint(run: Path) -> dict[str, str]:
    paths = run_paths(run)
    out = {"cnn/model.pt (weights, buffers)": _weights(paths.checkpoint)}
    out["cnn/history.csv (without times)"] = _csv_without_times(paths.history)
    out.update(_features(paths.features))
    if paths.frozen_features.exists():  # the pretrained backbone's, where the CNN started from one
        out.update(_features(paths.frozen_features))
    for path in sorted(run.glob("*/*predictions.csv")) + sorted(run.glob("*/*.classification_report.txt")):
        out[str(path.relative_to(run))] = _digest(path.read_bytes())
    for path in sorted(paths.heads.glob("*.json")):
        out[str(path.relative_to(run)) + " (params, scores)"] = _json(path)
    for path in sorted(paths.heads.glob("*.skops")):
        out[str(path.relative_to(run)) + " (fitted arrays)"] = _skops(path)
    for name in ("config.json", "cnn/metrics.json", "splits.json", "compare/summary.json", "compare/metrics.csv", "compare/per_class.csv"):
        path = run / name
        if path.exists():
            out[name] = _json(path) if name.endswith(".json") else _csv_without_times(path)
    return out


def main(argv: list[str]) -> int:
    runs = [Path(a) for a in argv]
    if not 1 <= len(runs) <= 2:
        print(__doc__.strip().splitlines()[0])
        return 2
    prints = [fingerprint(r) for r in runs]
    if len(prints) == 1:
        for name, h in prints[0].items():
            print(f"{h}  {name}")
        return 0
    names = list(dict.fromkeys([*prints[0], *prints[1]]))
    differ = 0
    for name in names:
        a, b = prints[0].get(name, "-"), prints[1].get(name, "-")
        differ += a != b
        print(f"{'same     ' if a == b else 'DIFFERENT'}  {a}  {b}  {name}")
    print(f"{len(names) - differ} of {len(names)} artifacts identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
