"""The per-pass bf16 speed-ups behind `cpu_bf16_step` (models/registry.py) and `--amp` auto's choice.

    python scripts/bench_bf16_steps.py [--threads 1,2]

For each architecture and size, in one process, on random inputs (batches of 32, channels-last): the
forward pass in inference mode and the training step (forward, cross-entropy, backward, AdamW), each
under `torch.autocast("cpu", torch.bfloat16)` and without; best of 3 after a warm-up. It prints the
milliseconds and fp32 / bf16 ratio of each. Meaningful only on a CPU that computes bf16 natively
(AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower) and on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurepipe.device import native_bf16  # noqa: E402
from featurepipe.models import create_model  # noqa: E402

CASES = (("sixblock", 28, 1, None), ("sixblock", 128, 1, None), ("efficientnet_lite0", 160, 3, "imagenet"))
BATCH = 32


def best_seconds(fn, rounds: int = 3) -> float:
    fn()
    return min(_timed(fn) for _ in range(rounds))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def passes(arch: str, px: int, channels: int, weights: str | None) -> dict[bool, tuple[float, float]]:
    """{bf16: (forward seconds, training step seconds)} for a batch."""
    torch.manual_seed(0)
    net = create_model(arch, 4, channels, [0.5] * channels, [0.25] * channels, weights=weights)
    net = net.to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, channels, px, px).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (BATCH,))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-4)
    seconds = {}
    for bf16 in (False, True):
        def forward():
            net.eval()
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                net(x)

        def step():
            net.train()
            optimizer.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            optimizer.step()

        seconds[bf16] = (best_seconds(forward), best_seconds(step))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, native bf16: {native_bf16() or 'none (emulated: the ratios mean nothing)'}")
    print("| threads | model | forward fp32 / bf16 ms | ratio | training step fp32 / bf16 ms | ratio |")
    print("|---|---|---|---:|---|---:|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for arch, px, channels, weights in CASES:
            s = passes(arch, px, channels, weights)
            (f32, s32), (f16, s16) = s[False], s[True]
            print(f"| {threads} | {arch} @ {px} | {f32 * 1e3:.0f} / {f16 * 1e3:.0f} | {f32 / f16:.2f} | "
                  f"{s32 * 1e3:.0f} / {s16 * 1e3:.0f} | {s32 / s16:.2f} |", flush=True)


if __name__ == "__main__":
    main()
