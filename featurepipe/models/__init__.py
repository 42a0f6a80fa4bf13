"""One registry that turns an architecture name into a `Net`, and the checkpoint format.

Every `Net` takes uint8 images (N, C, S, S) and brings them to its input range itself (`scale`: the
intensity window, then `normalize`), so a checkpoint is self-contained and training, extract,
predict and Grad-CAM see one preprocessing: `net.forward_features(x)` is the embedding, `net(x)` the
logits. A float input is taken as already scaled to [0, 1] (training augments between the two).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from featurepipe.data.intensity import FULL_RANGE
from featurepipe.errors import FeaturepipeError
from featurepipe.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRETRAINED_STATS,
    TORCHVISION_ARCHS,
    efficientnet_lite0,
    fetch_weights,
    imagenet_weights_file,
    load_state_dict_file,
    load_weights,
    torchvision_backbone,
)
from featurepipe.models.embedding import LAYERS, TTA, pooled_last_blocks, tta_views
from featurepipe.models.sixblock import SixBlock

ARCHS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "sixblock": lambda in_channels: (m := SixBlock(in_channels), m.out_dim),
    **{name: (lambda in_channels, name=name: torchvision_backbone(name)) for name in TORCHVISION_ARCHS},
    "efficientnet_lite0": lambda in_channels: efficientnet_lite0(),
}


class Net(nn.Module):
    def __init__(self, features: nn.Module, dim: int, num_classes: int, mean: list[float], std: list[float],
                 dropout: float = 0.3, window: tuple[float, float] = FULL_RANGE) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Not in the state dict (older checkpoints have none): the checkpoint's meta carries it.
        self.window = (float(window[0]), float(window[1]))
        self.features = features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        self.embedding_dim = dim

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels → [0, 1] through the intensity window (see data.intensity): a data set exported
        with grey levels 0-2 reaches the model as 0, 0.5 and 1, wherever the image comes from."""
        if x.dtype != torch.uint8:
            return x
        lo, hi = self.window
        if (lo, hi) == FULL_RANGE:
            return x.float().div_(255.0)
        return x.float().sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale(x) - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def embed(self, x: torch.Tensor, layer: str = "penultimate", tta: str = "none") -> torch.Tensor:
        """The features heads are fitted on (see models.embedding): `layer`, averaged over `tta` views.

        With the default layer, `self.head(self.embed(x, tta=...))` is the CNN's TTA logits: the mean
        of the views' logits, as the head is linear.
        """
        views = tta_views(self.normalize(x), tta)
        total = sum(self._pooled(v, layer) for v in views)
        return total / len(views)

    def _pooled(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        if layer == "penultimate":
            return self.features(x)
        return torch.cat(pooled_last_blocks(self.features, x, 2), dim=1)

    @torch.no_grad()
    def embed_dim(self, layer: str, img_size: int) -> int:
        if layer == "penultimate":
            return self.embedding_dim
        x = torch.zeros(1, self.mean.shape[1], img_size, img_size, dtype=torch.uint8, device=self.mean.device)
        training = self.training
        self.eval()  # a forward in train mode would move BatchNorm's running statistics
        try:
            return int(self.embed(x, layer).shape[1])
        finally:
            self.train(training)


def in_channels_for(arch: str, grey: bool) -> int:
    # torchvision backbones are built for RGB; grey images are replicated to 3 channels on decode.
    return 1 if arch == "sixblock" and grey else 3


def normalisation_for(arch: str, weights: str | None) -> tuple[list[float] | None, list[float] | None]:
    """The pretrained weights' own input normalisation; (None, None): use the data's statistics."""
    if weights is None or arch not in PRETRAINED_STATS:
        return None, None
    return PRETRAINED_STATS[arch]


def min_img_size(arch: str) -> int:
    """The smallest input side an architecture accepts (below it a stage has nothing left to pool)."""
    # densenet121 and convnext_tiny downsample 32x without padding; lite0's "same" padding is static,
    # computed for its 224-px input, and leaves a 5x5 kernel bigger than its input below 32 px.
    return 32 if arch in ("densenet121", "convnext_tiny", "efficientnet_lite0") else 28


def create_model(arch: str, num_classes: int, in_channels: int, mean: list[float], std: list[float],
                 weights: str | None = None, window: tuple[float, float] = FULL_RANGE) -> Net:
    if arch not in ARCHS:
        raise FeaturepipeError(f"--arch {arch}: unknown architecture; choose one of {', '.join(ARCHS)}")
    features, dim = ARCHS[arch](in_channels)
    if weights is not None:
        path = imagenet_weights_file(arch) if weights == "imagenet" else Path(weights)
        state = load_state_dict_file(path)
        prefix = "features."
        if any(k.startswith(prefix) for k in state):  # a featurepipe checkpoint: take its backbone only
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        load_weights(features, state, str(path))
    return Net(features, dim, num_classes, mean, std, window=window)


def save_checkpoint(path: Path, net: Net, meta: dict[str, Any], **extra: Any) -> None:
    """meta: arch, num_classes, in_channels, mean, std, window, img_size, class_names (all JSON-able)."""
    from featurepipe.runs import atomic_path

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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


__all__ = [
    "ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "LAYERS", "Net", "TTA", "fetch_weights", "create_model", "fingerprint",
    "in_channels_for", "load_checkpoint", "min_img_size", "normalisation_for", "save_checkpoint",
]
