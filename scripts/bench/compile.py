"""Does torch.compile (inductor) pay for itself on a featurepipe run? Compile time against the time it saves.

    python -m scripts.bench compile [--arch sixblock] [--img-size 28] [--channels 1] [--steps 20]

In one process, on random uint8 images, for the training step (forward, loss, backward, AdamW; batch
--train-batch) and the extraction forward pass (inference mode; batch --extract-batch): the eager time
per call (median of --steps, after a warm-up), the compiled one's, and the first compiled call's time
less an eager call (the compile). It prints how many calls it takes for the saving to repay the
compile: a run is worth compiling only where it makes more calls than that (PneumoniaMNIST's
4 708 training images at batch 64 are 74 steps an epoch; its 5 856 images extract in 23 batches of
256). A last, smaller batch compiles again (dynamic=False) or needs dynamic shapes: not counted here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from featurepipe.models import create_model
from scripts.common import train_step


def timed(fn, steps: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of `steps` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def step_fn(net, x, y):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    return lambda: train_step(net, loss_fn, opt, x, y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sixblock")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--extract-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--passes", default="step,extract", help="which to measure: step, extract or both")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    shape = (args.channels, args.img_size, args.img_size)

    def model():
        torch.manual_seed(0)
        net = create_model(args.arch, 2, args.channels, [0.5] * args.channels, [0.25] * args.channels)
        return net.to(memory_format=torch.channels_last)

    def images(n):
        return torch.randint(0, 256, (n, *shape), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)

    x, y = images(args.train_batch), torch.randint(0, 2, (args.train_batch,))
    xe = images(args.extract_batch)
    passes = {
        "step": ("training step", lambda net: step_fn(net.train(), x, y)),
        "extract": ("extract forward", lambda net: (lambda: torch.inference_mode()(net.eval().forward_features)(xe))),
    }
    for what, make in (passes[p] for p in args.passes.split(",")):
        eager_net = model()
        _, eager = timed(make(eager_net), args.steps)
        compiled_net = model()
        compiled_net.compile()  # inductor; the module's own forward, as a user would switch it on
        first, compiled = timed(make(compiled_net), args.steps)
        compile_s = first - eager
        saving = eager - compiled
        repay = compile_s / saving if saving > 0 else float("inf")
        print(f"{args.arch} @ {args.img_size} px, {what}: eager {eager * 1000:.1f} ms, compiled {compiled * 1000:.1f} ms "
              f"({eager / compiled:.2f}x), compile {compile_s:.1f} s: repaid after "
              + (f"{repay:.0f} calls" if repay != float('inf') else "never (no saving)"), flush=True)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
