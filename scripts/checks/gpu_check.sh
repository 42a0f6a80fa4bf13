#!/usr/bin/env bash
# On a CUDA machine, in one go: the CUDA tests (issue 16's included: batches sliced on the GPU equal the
# loader's, nvJPEG's pixels within tolerance of the CPU decoder's, a JPEG folder extracted on the GPU), the
# rest of the suite with the GPU as the default device, and the bench table with --device cuda (extract
# and training there now go through data/gpu.py: in-memory sources sliced on the device, JPEGs by nvJPEG). Each step has its own time limit; logs go to OUTDIR.
#   bash scripts/checks/gpu_check.sh [OUTDIR]     (python3 with the project's dependencies, pytest-xdist if there;
#                                           ../shared/data/pneumoniamnist.npz beside the checkout)
# On an H200 with 16 cores the three steps took about 30 s, 265 s and 115 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1  # for pytest; the scripts run as modules from here
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
timeout 240 $py -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
timeout 360 $py -m scripts.bench pipeline --device cuda --rounds 2 --images 3000 --mem-n 400 2>&1 | grep -v "━" | tee "$out/bench.log"
# torchrun's 2-process tests need 2 GPUs once CUDA is the default device; they run on the CPU in CI.
parallel=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 240 $py -m pytest -q -p no:cacheprovider $parallel --ignore tests/test_distributed.py --ignore tests/test_cuda.py \
    2>&1 | tee "$out/suite.log" | tail -30
