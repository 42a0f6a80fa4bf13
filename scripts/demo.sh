#!/usr/bin/env bash
# The whole pipeline on the built-in demo data (scikit-learn's digits), ending with the accuracy chart.
set -euo pipefail
cd "$(dirname "$0")/.."
run=artifacts/demo
fp=.venv/bin/featurepipe
# Digits are easy: 15 epochs reach ~99 %, and keep the whole demo under two minutes on 2 cores.
$fp train-cnn --data demo --out "$run" --overwrite --epochs 15
$fp extract --run "$run"
$fp fit-heads --run "$run" --heads svm,rf,logreg
$fp compare --run "$run"
echo "chart: $run/compare/accuracy.png"
