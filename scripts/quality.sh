#!/usr/bin/env bash
# Reproduces the README's quality tables: StagFormer variants against P = 1 baselines under one
# token budget, validation bits per byte. SUITE=paper (the paper-faithful rows, 1500 steps, seed
# 0), screen (each stack-1 recipe at 400 steps) or recipe (the adopted recipe against the
# baselines, 1500 steps, seeds 0 1 2). Uses the demo's tokenizer; THREADS=N sets torch's threads.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/corpus}
make setup
.venv/bin/python benchmarks/quality.py --train "$CORPUS/train.txt.xz" --val "$CORPUS/val.txt.xz" \
    --tokenizer stagcompile/demo/tokenizer.json --suite "${SUITE:-paper}" \
    ${THREADS:+--threads "$THREADS"} ${STEPS:+--steps "$STEPS"} ${SEEDS:+--seeds $SEEDS} \
    --out "${OUT:-runs/quality}"
