#!/usr/bin/env bash
# The README's performance section: `small` preset, staggered vs sequential vs P = 1 baseline vs
# PyTorch eager, batch 1 and 8, context 128 and 1024, unbounded and bounded cross window.
source "$(dirname "$0")/small_ckpt.sh"
.venv/bin/stagcompile bench "$OUT/ckpt" --batch 1,8 --context 128,1024 --window unbounded,bounded \
    --iters 5 --rounds 20 --warmup 3 --json "$OUT/bench.json" --plot "$OUT/bench.png"
