#!/usr/bin/env bash
# Reproduces the shipped demo checkpoint (stagcompile/demo/): train, then store it in fp16.
# Needs the offline corpus (../shared/data/corpus by default, or CORPUS=...); about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/corpus}
OUT=${OUT:-runs/demo}
make setup
.venv/bin/stagcompile train "$CORPUS/train.txt.xz" --val "$CORPUS/val.txt.xz" -o "$OUT" \
    --preset demo --steps 4000 --batch-size 16 --seq-len 128 --lr 3e-3 --warmup 100 \
    --eval-every 250 --save-every 500 --seed 0 \
    --set cross_gate=true --stack1-lr-mult 0.1 --aux-loss 1    # the stack-1 recipe (README)
.venv/bin/python -m stagcompile.demo "$OUT" stagcompile/demo
