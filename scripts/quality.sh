#!/usr/bin/env bash
# Reproduces the README's quality table: StagFormer variants against P = 1 baselines under one
# token budget, validation bits per byte. Uses the demo run's tokenizer (scripts/train_demo.sh) or
# the shipped one. About 50 minutes on 2 cores with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/corpus}
make setup
.venv/bin/python benchmarks/quality.py --train "$CORPUS/train.txt.xz" --val "$CORPUS/val.txt.xz" \
    --tokenizer stagcompile/demo/tokenizer.json --steps "${STEPS:-1500}" --seeds ${SEEDS:-0} \
    --out "${OUT:-runs/quality}"
