#!/usr/bin/env bash
# ONNX Runtime thread-pool spinning off (the runtime's default) and on: two runs of one cell,
# written to $OUT/spinning-off.json and $OUT/spinning-on.json.
source "$(dirname "$0")/small_ckpt.sh"
for mode in off on; do
    flag=--no-spinning; [ "$mode" = on ] && flag=--spinning
    .venv/bin/stagcompile bench "$OUT/ckpt" --batch 1 --context 128 --window unbounded \
        --iters 5 --rounds 30 "$flag" --json "$OUT/spinning-$mode.json"
done
