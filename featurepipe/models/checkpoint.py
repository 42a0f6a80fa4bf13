"""Building a `Net` from a registry entry, and the checkpoint format: meta (JSON-able) and state dict."""

from __future__ import annotations

import functools
import io
import itertools
from pathlib import Path
from typing import Any

import torch

from featurepipe.data.intensity import FULL_RANGE
from featurepipe.errors import FeaturepipeError
from featurepipe.files import atomic_path, file_sha256
from featurepipe.models.backbones import load_state_dict_file, load_weights
from featurepipe.models.net import Net
from featurepipe.models.registry import get_arch, imagenet_weights_file


def create_model(arch: str, num_classes: int, in_channels: int, mean: list[float], std: list[float],
                 weights: str | None = None, window: tuple[float, float] = FULL_RANGE) -> Net:
    entry = get_arch(arch)
    features = entry.build(in_channels)
    if weights is not None:
        path = imagenet_weights_file(arch) if weights == "imagenet" else Path(weights)
        state = load_state_dict_file(path)
        prefix = "features."
        if any(k.startswith(prefix) for k in state):  # a featurepipe checkpoint: take its backbone only
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        load_weights(features, state, str(path))
    return Net(features, entry.width, num_classes, mean, std, window=window, arch=arch)


def save_checkpoint(path: Path, net: Net, meta: dict[str, Any], **extra: Any) -> None:
    """meta: arch, num_classes, in_channels, mean, std, window, img_size, class_names (all JSON-able)."""
    # Serialised in memory, written by Python: torch's own file writer turns a full disk into an
    # unexplained RuntimeError, a Python write into the OSError (ENOSPC) that atomic_path reports.
    buf = io.BytesIO()
    torch.save({"meta": meta, "state_dict": net.state_dict(), **extra}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[Net, dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = ckpt["meta"]
    except FileNotFoundError:
        raise FeaturepipeError(f"{path}: no checkpoint; run featurepipe train-cnn first") from None
    except Exception as e:
        raise FeaturepipeError(f"{path}: not a featurepipe checkpoint ({type(e).__name__}); re-run train-cnn") from None
    # Built on the meta device, then given the checkpoint's tensors: no random initialisation to throw
    # away (a third of a second for resnet18, more for the larger backbones).
    build = functools.partial(create_model, meta["arch"], meta["num_classes"], meta["in_channels"], meta["mean"],
                              meta["std"], window=tuple(meta.get("window", FULL_RANGE)))
    with torch.device("meta"):
        net = build()
    net.load_state_dict(ckpt["state_dict"], assign=True)
    if any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):  # a tensor the file does not hold
        net = build()
        net.load_state_dict(ckpt["state_dict"])
    return net.to(device).eval(), meta


def fingerprint(path: Path) -> str:
    """A short content hash of a checkpoint, stored with everything derived from it."""
    return file_sha256(path)[:16]
