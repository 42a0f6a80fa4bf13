"""The per-pass bf16 speed-ups behind `cpu_bf16_step` (models/registry.py) and `--amp` auto's choice.

    python -m scripts.bench bf16_steps [--threads 1,2] [--seconds 4]

For each architecture and size, on random uint8 batches of 32: scripts/common.py's pure forward pass (as extract
runs it) and pure training step (forward, cross-entropy, backward, AdamW), each under bf16 autocast and
in fp32, in images per second over --seconds after a warm-up. It prints the rates and the bf16 / fp32
ratio of each. Meaningful only on a CPU that computes bf16 natively (AVX512-BF16 or AMX; elsewhere bf16
is emulated and slower) and on a quiet machine.
"""

from __future__ import annotations

import argparse

import torch

from featurepipe.device import native_bf16
from featurepipe.models import create_model
from scripts.common import pure_forward, pure_step

CASES = (("sixblock", 28, 1, None), ("sixblock", 128, 1, None), ("efficientnet_lite0", 160, 3, "imagenet"))
BATCH = 32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--seconds", type=float, default=4.0, help="how long each rate is measured")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, native bf16: {native_bf16() or 'none (emulated: the ratios mean nothing)'}")
    print("| threads | model | forward fp32 / bf16 img/s | ratio | training step fp32 / bf16 img/s | ratio |")
    print("|---|---|---|---:|---|---:|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for arch, px, channels, weights in CASES:
            torch.manual_seed(0)
            net = create_model(arch, 4, channels, [0.5] * channels, [0.25] * channels, weights=weights)
            net = net.to(memory_format=torch.channels_last)
            shape = (channels, px, px)
            fwd = [pure_forward(net, shape, BATCH, args.seconds, amp) for amp in (False, True)]
            step = [pure_step(net, shape, BATCH, 4, args.seconds, amp) for amp in (False, True)]
            print(f"| {threads} | {arch} @ {px} | {fwd[0]:.0f} / {fwd[1]:.0f} | {fwd[1] / fwd[0]:.2f} | "
                  f"{step[0]:.0f} / {step[1]:.0f} | {step[1] / step[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
