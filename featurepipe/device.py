"""Where tensors run: device choice, batch transfer and mixed precision in one place."""

from __future__ import annotations

import contextlib

import torch

from featurepipe.errors import FeaturepipeError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise FeaturepipeError(f"--device {name}: choose auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FeaturepipeError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Loaders pin memory on CUDA, so the copy overlaps compute; channels_last suits conv kernels on both.
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA where the card supports it, fp16 otherwise; a no-op on the CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, enabled: bool = True) -> bool:
    return device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
