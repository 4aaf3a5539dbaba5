#!/usr/bin/env bash
# The whole pipeline on the built-in SmolLM2-135M:
#   1. compress to RATIO of the linear-layer parameters (whiten, sensitivity planner, block by block);
#   2. recover by distillation from the dense model on two bundled plays (The Tempest, Julius Caesar),
#      keeping the best weights by perplexity on Hamlet;
#   3. report both folders, with perplexity on Macbeth (never calibrated, trained or selected on).
# On 2 CPU cores: 12 minutes for step 1, 9 for step 2 and 7 for the reports (27.5 in all, measured).
# Its output, committed: reports/smollm2-recipe-r0.6 (perplexity on Macbeth 38.49 dense, 87.01
# compressed, 60.55 recovered).
# Usage: bash recipes/smollm2-compress-recover.sh [OUTPUT_PREFIX] [RATIO] [STEPS]
set -euo pipefail
out=${1:-smollm2-r0.6}
ratio=${2:-0.6}
steps=${3:-50}
texts=$(python -c "from lowrank.calibration import sample_text_path; print(sample_text_path('tempest').parent)")

lowrank compress smollm2-135m --ratio "$ratio" -o "$out"
lowrank recover "$out" --data "$texts/tempest.txt" --data "$texts/julius_caesar.txt" \
    --eval "$texts/hamlet.txt" --eval-windows 8 --eval-every 10 --steps "$steps" --lr 2e-4 --warmup 3 \
    -o "$out-recovered"
lowrank report "$out" --text "$texts/macbeth.txt" --max-windows 40 -o "$out-report"
lowrank report "$out-recovered" --text "$texts/macbeth.txt" --max-windows 40 -o "$out-recovered-report"
