#!/usr/bin/env bash
# ONNX Runtime thread-pool spinning off (the runtime's default) and on: two runs of one cell.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
make setup >/dev/null
set -x
.venv/bin/stagcompile init --preset small -o "$OUT/ckpt" --force
.venv/bin/stagcompile bench "$OUT/ckpt" --batch 1 --context 128 --window unbounded \
    --iters 5 --rounds 30 --json "$OUT/spinning-off.json"
.venv/bin/stagcompile bench "$OUT/ckpt" --batch 1 --context 128 --window unbounded \
    --iters 5 --rounds 30 --spinning --json "$OUT/spinning-on.json"
