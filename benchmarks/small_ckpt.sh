#!/usr/bin/env bash
# Sourced by the bench scripts: sets up the environment and writes a random `small` checkpoint
# into $OUT/ckpt (OUT defaults to out/bench).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
make setup >/dev/null
set -x
.venv/bin/stagcompile init --preset small -o "$OUT/ckpt" --force
