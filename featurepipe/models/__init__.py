"""The models: one registry entry per architecture (registry), the `Net` every one becomes (net), the
checkpoint format (checkpoint), and which embedding heads see (embedding).

Every `Net` takes uint8 images (N, C, S, S) and brings them to its input range itself (`scale`: the
intensity window, then `normalize`), so a checkpoint is self-contained and training, extract,
predict and Grad-CAM see one preprocessing: `net.forward_features(x)` is the embedding, `net(x)` the
logits. A float input is taken as already scaled to [0, 1] (training augments between the two).
"""

from __future__ import annotations

from featurepipe.models.backbones import IMAGENET_MEAN, IMAGENET_STD, LITE0_INSTALL
from featurepipe.models.checkpoint import create_model, fingerprint, load_checkpoint, save_checkpoint
from featurepipe.models.embedding import LAYERS, TTA
from featurepipe.models.net import Net
from featurepipe.models.registry import ARCHS, Arch, arch_names, fetch_weights, get_arch, imagenet_weights_file

__all__ = [
    "ARCHS", "Arch", "IMAGENET_MEAN", "IMAGENET_STD", "LAYERS", "LITE0_INSTALL", "Net", "TTA", "arch_names",
    "create_model", "fetch_weights", "fingerprint", "get_arch", "imagenet_weights_file", "load_checkpoint",
    "save_checkpoint",
]
