#!/usr/bin/env bash
# Compress the built-in SmolLM2-135M to 80% of its linear-layer parameters with truncation-aware
# whitening, then compare perplexity with the dense model on Macbeth (bundled, never calibrated on).
# Usage: bash recipes/smollm2-compress-evaluate.sh [OUTPUT_FOLDER] [RATIO]
set -euo pipefail
out=${1:-smollm2-135m-whiten-r0.8}
ratio=${2:-0.8}

lowrank compress smollm2-135m --ratio "$ratio" --method whiten --samples 64 --seq-len 512 -o "$out"
lowrank eval smollm2-135m --max-windows 40 --json "$out.dense-eval.json"
lowrank eval "$out" --max-windows 40 --json "$out.eval.json"
