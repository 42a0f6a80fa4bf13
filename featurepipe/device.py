"""Where tensors run: device choice, batch transfer and mixed precision in one place."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Callable

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


# glibc serves blocks up to this size from its heap, where freed ones are reused; larger ones it maps
# afresh on every allocation and unmaps on free (M_MMAP_THRESHOLD's maximum on 64-bit).
HEAP_BLOCK_MAX = 32 << 20


@functools.cache
def reuse_heap_blocks() -> bool:
    """For inference on the CPU: serve every block up to HEAP_BLOCK_MAX from glibc's heap and keep what
    a forward pass frees there for the next one (see keep_freed_memory for the cost it avoids).

    Blocks above HEAP_BLOCK_MAX are still mapped and unmapped, so the heap only ever holds blocks of
    one pass's sizes, and memory stays flat over any number of batches; the forward passes are sized
    to fit (images_per_pass). Returns whether the allocator was tuned: not without glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return (bool(libc.mallopt(m_mmap_threshold, HEAP_BLOCK_MAX))
            and bool(libc.mallopt(m_trim_threshold, 4 * HEAP_BLOCK_MAX)))


@torch.inference_mode()
def images_per_pass(net: torch.nn.Module, img_size: int, amp: bool | None = None) -> int | None:
    """How many images one forward pass on the CPU takes, so that its largest activation fits in a
    heap block (reuse_heap_blocks); None (the whole batch at once) on a GPU or without glibc.

    Measured on one blank image with forward hooks on every module of `net` (a models.Net).
    On resnet18 at 224 px, 2 cores: 64 images in passes of 8 ran at 90 images/s, as fast as 64 at once
    with the heap kept (keep_freed_memory) and faster than glibc's defaults (55-60), and peaked at
    850 MB instead of 1.3-1.5 GB.
    """
    device = net.mean.device
    if device.type != "cpu" or not reuse_heap_blocks():
        return None
    image = torch.zeros(1, net.mean.shape[1], img_size, img_size, dtype=torch.uint8)
    largest = image.numel() * 4  # the input, normalised to float

    def hook(module, inputs, out) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with autocast(device, amp):
            net.forward_features(image)
    finally:
        for h in handles:
            h.remove()
    # A quarter to spare: kernels reorder their input into padded, blocked layouts of about its size.
    return max(1, int(HEAP_BLOCK_MAX / (1.25 * largest)))


def in_passes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, per_pass: int | None) -> torch.Tensor:
    """forward(x), computed `per_pass` images at a time (images_per_pass)."""
    if per_pass is None or len(x) <= per_pass:
        return forward(x)
    return torch.cat([forward(part) for part in x.split(per_pass)])


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep the memory a training step frees for the next step instead of handing it back.

    A step allocates and frees hundreds of MB of activations. Blocks that large glibc maps afresh on
    every allocation and unmaps on free (its mmap threshold is 32 MB at most), and the kernel
    zero-fills every page again on first touch: on resnet18 at 224 px that cost a CPU forward pass a
    third of its speed (71 vs 110 images/s). Served from the heap and not trimmed, the memory is
    reused. The price is a heap whose peak drifts from run to run (freed holes between live blocks):
    training, whose peak is mostly its cached images, trims once an epoch (release_freed_memory);
    inference, whose memory must stay flat over any number of images, does not use this (tuned, the
    peak of extract on 2000 images varied from 1.5 to 1.9 GB, even trimmed every batch) but runs in
    passes whose blocks the heap reuses (reuse_heap_blocks, images_per_pass). jemalloc and tcmalloc
    keep freed memory by design. Returns whether the allocator was tuned: not without glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def release_freed_memory() -> None:
    """Hand the pages of freed memory back (glibc's malloc_trim): bounds a kept heap's drift."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Loaders pin memory on CUDA, so the copy overlaps compute; channels_last suits conv kernels on both.
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# A training step in bf16 is used where its architecture's step ran at least this much faster than in
# fp32 on a CPU with native bf16 (models.registry's `cpu_bf16_step`): below it the gain is within a
# shared machine's noise and not worth the rounding.
BF16_STEP_MIN_SPEEDUP = 1.2


# Overrides the detection: 0 treats the CPU as without native bf16, 1 as with it (a CPU the detection
# does not know, e.g. ARM's bf16 extensions, which featurepipe has not measured). The test suite sets 0,
# so that its comparisons with fp32 arithmetic hold on every CPU.
NATIVE_BF16_VARIABLE = "FEATUREPIPE_CPU_BF16"


def native_bf16() -> str | None:
    """The instructions with which this CPU computes bf16 itself (AMX, AVX512-BF16), or None: without
    them every bf16 operation is emulated through fp32, slower than fp32 (e.g. AVX2-only CPUs)."""
    told = os.environ.get(NATIVE_BF16_VARIABLE, "")
    if told in ("0", "1"):
        return f"{NATIVE_BF16_VARIABLE}=1 says so" if told == "1" else None
    if told:
        raise FeaturepipeError(f"{NATIVE_BF16_VARIABLE}={told}: give 0 (no native bf16) or 1 (native bf16), or unset it")
    caps = torch.cpu.get_capabilities()
    found = [name for key, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if caps.get(key)]
    return " and ".join(found) or None


@dataclass(frozen=True)
class Precision:
    """Which passes run under autocast (`--amp`): forward-only ones (evaluation, BatchNorm
    recalibration, extract, predict) and the training step; `reason` says why, for the log and
    config.json."""

    forward: bool
    train_step: bool
    reason: str

    def record(self, device: torch.device) -> dict[str, str]:
        return {"forward": _dtype_name(device, self.forward), "train_step": _dtype_name(device, self.train_step),
                "reason": self.reason}

    def describe(self, device: torch.device, training: bool = True) -> str:
        r = self.record(device)
        passes = f"forward passes {r['forward']}, training step {r['train_step']}" if training else r["forward"]
        return f"precision: {passes} ({self.reason})"


def choose_precision(device: torch.device, amp: bool | None = None, arch: str | None = None) -> Precision:
    """`--amp` forces autocast for every pass, `--no-amp` fp32 everywhere. Left out (None): on CUDA
    autocast everywhere (bf16 where the card has it, else fp16 with a gradient scaler); on a CPU with
    native bf16, bf16 for forward passes (2-4x faster in the measurements of models.registry) and for
    the training step where `arch`'s step measured at least BF16_STEP_MIN_SPEEDUP faster (its registry
    entry's `cpu_bf16_step`; not measured: fp32). Without `arch` (no training step): forward passes
    only. fp32 on other CPUs."""
    if amp is not None:
        return Precision(amp, amp, "--amp" if amp else "--no-amp")
    if device.type == "cuda":
        return Precision(True, True, "CUDA: bf16 where the card has it, else fp16")
    native = native_bf16()
    if native is None:
        told = os.environ.get(NATIVE_BF16_VARIABLE) == "0"
        return Precision(False, False, f"{NATIVE_BF16_VARIABLE}=0" if told else
                         "this CPU has no native bf16 (AVX512-BF16 or AMX): emulated, it is slower than fp32")
    native = f"this CPU computes bf16 natively ({native})"
    if arch is None:
        return Precision(True, False, native)
    from featurepipe.models import get_arch  # not at the top: the models need nothing from here

    speedup = get_arch(arch).cpu_bf16_step
    faster = speedup is not None and speedup >= BF16_STEP_MIN_SPEEDUP
    step = (f"{arch}'s bf16 training step measured at {speedup:.2f}x fp32's speed" if speedup is not None
            else f"{arch}'s bf16 training step not measured")
    return Precision(True, faster, f"{native}; {step}" + ("" if faster else ", so the step stays fp32"))


def _dtype_name(device: torch.device, on: bool) -> str:
    if not on:
        return "fp32"
    return "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"


def autocast(device: torch.device, amp: bool | None = None):
    """Autocast where `amp` asks for it (a field of `Precision`): bf16, or fp16 on a card without bf16.
    None: as choose_precision decides for a forward-only pass."""
    if amp is None:
        amp = choose_precision(device).forward
    if not amp:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def needs_grad_scaler(device: torch.device, amp: bool | None = None) -> bool:
    """For the training step's `amp` (Precision.train_step): fp16 gradients underflow without scaling."""
    return device.type == "cuda" and amp is not False and not torch.cuda.is_bf16_supported()
