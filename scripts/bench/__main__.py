"""featurepipe's benchmarks, one runner: python -m scripts.bench NAME [its options]  (NAME --help: its own)

  pipeline      extract and training throughput against the model's limit, memory, the features file
  amp           fp32 against --amp's choices on issue 21's two configurations
  bf16_steps    bf16 / fp32 speed of each architecture's forward pass and training step
  cache         the disk cache on an archive above the memory cap
  cache_checks  what the disk cache's checks cost, two trees alternating
  compare       wall time of `featurepipe compare` on a finished run
  compile       whether torch.compile repays its compile time
  heads         fit time of heads on synthetic embeddings
  torchrun_memory  peak memory of extract under torchrun on N and 8N images, every rank
  crossval_jobs    a cross-validation in sequence against fold workers: wall time, identical results

The passes they time and the fresh-process helpers are scripts/common.py's.
"""

from __future__ import annotations

import importlib
import sys

NAMES = ("pipeline", "amp", "bf16_steps", "cache", "cache_checks", "compare", "compile", "heads", "torchrun_memory",
         "crossval_jobs")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        sys.exit(__doc__)
    name, argv = sys.argv[1], sys.argv[2:]
    sys.argv = [f"python -m scripts.bench {name}", *argv]
    importlib.import_module(f"scripts.bench.{name}").main(argv)


if __name__ == "__main__":
    main()
