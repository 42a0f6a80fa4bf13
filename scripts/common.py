"""What the scripts share: where the real data lie, featurepipe run in a fresh process (as a user's
command runs, and unable to inherit the caller's memory), and the passes the benchmarks time: the
model's pure forward pass and training step on tensors already in memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from featurepipe.device import autocast, choose_precision, images_per_pass, in_passes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def featurepipe(*args, **kwargs) -> subprocess.CompletedProcess:
    """`featurepipe ARGS` in a fresh process (output captured as text unless told otherwise)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-m", "featurepipe", *map(str, args)], **kwargs)


def fresh_python(code: str, **kwargs) -> str:
    """The last line `code` prints, run by a new interpreter in this one's folder (the repository root,
    whose featurepipe it imports); exits with its error output if it fails."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"a fresh process failed:\n{code}\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def train_step(net, loss_fn, opt, x, y, device: torch.device | None = None, amp: bool | None = False) -> None:
    """One optimizer step as train-cnn takes it, without its callbacks: forward (autocast where `amp`),
    loss, backward, step."""
    with autocast(device or x.device, amp):
        loss = loss_fn(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pure_forward(net, shape, batch: int, seconds: float = 8.0, amp: bool | None = None) -> float:
    """The model alone, run as extract runs it: on its device, with its precision (`amp` None: as extract's
    default chooses), on the CPU in passes sized to glibc's heap blocks."""
    device = net.mean.device
    x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    net.eval()
    per_pass = images_per_pass(net, shape[-1])

    def forward():
        with autocast(device, amp):
            return in_passes(net.forward_features, x, per_pass)

    with torch.inference_mode():
        return _rate(forward, batch, device, seconds)


def pure_step(net, shape, batch: int, classes: int, seconds: float = 8.0, amp: bool | None = None) -> float:
    """A training step alone (forward, loss, backward, AdamW); `amp` None: as train-cnn's default chooses."""
    device = net.mean.device
    x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    if amp is None:
        amp = choose_precision(device, None, net.arch).train_step
    return _rate(lambda: train_step(net, loss_fn, opt, x, y, device, amp), batch, device, seconds)


def _rate(work, batch: int, device: torch.device, seconds: float) -> float:
    """Images/s of `work` repeated for `seconds`, after one warm-up call; waits for the GPU to finish."""
    work()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        work()
        n += batch
    sync()
    return n / (time.perf_counter() - t0)
