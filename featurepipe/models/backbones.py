"""torchvision backbones as feature extractors, and loading their weights from local files only."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from featurepipe.errors import FeaturepipeError

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    """The model with its final Linear replaced by Identity, and the width of what that Linear saw.

    Replacing the last Linear works across families (resnet's fc, densenet's classifier,
    efficientnet's and convnext's classifier[-1]) and keeps whatever pooling/norm precedes it.
    """
    model = torchvision.models.get_model(arch, weights=None)
    parent, name, linear = _last_linear(model)
    setattr(parent, name, nn.Identity())
    return model, linear.in_features


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    found = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, name, child)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier")
    return found


def imagenet_weights_file(arch: str) -> Path:
    """torchvision's ImageNet weights for `arch` in torch's local cache (never downloaded here)."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        raise FeaturepipeError(
            f"--weights imagenet: {path} is missing; copy torchvision's {arch} weights file there "
            f"(from {weights.url} on a machine that is online) or pass --weights PATH"
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FeaturepipeError(f"--weights {path}: no such file") from None
    except Exception as e:  # torch raises many types for a file that is not a state dict
        raise FeaturepipeError(f"--weights {path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise FeaturepipeError(f"--weights {path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load matching tensors; the classifier of the source model is expected not to match."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.9 * len(own):
        raise FeaturepipeError(
            f"--weights {source}: only {len(usable)} of {len(own)} tensors fit this architecture; "
            "check that the file belongs to the --arch you chose"
        )
    module.load_state_dict(usable, strict=False)
