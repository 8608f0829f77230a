#!/usr/bin/env bash
# The check for a lent GPU machine (one H200 with CUDA, torch and triton; no TensorRT), in one run
# well inside 10 minutes, ending with a short table:
#   attention  benchmarks/attention.py: the Triton kernel, numerics and speed against torch SDPA
#   ptx        benchmarks/aot_launch.py: the AOT PTX (attention; ring commit in a CUDA graph)
#              loaded and launched through cuda-python, as the TensorRT runtime does
#   streams    benchmarks/streams.py: two-stream overlap of a StagFormer's two stacks with CUDA
#              graphs, batch 1, against one stream and a P = 1 model of equal depth
#   threads    benchmarks/thread_scaling.py: CPU thread scaling of the ONNX Runtime staggered
#              runtime at 4, 8 and 16 cores
#
#   scripts/device_check.sh [--dry-run] [WORKDIR]      (WORKDIR: $OUT if set, else out/device_check)
#
# Each part has a time limit and writes WORKDIR/PART.json; a failed part is reported and the others
# still run (exit status 1). Python packages the machine lacks travel as wheels in .whl/ and are
# installed into /tmp/site first (README, "GPU device check"). --dry-run runs every part's CPU
# version instead (what tests/test_device_check.py runs).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); shift; fi
WORK=${1:-${OUT:-out/device_check}}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p "$WORK"
status=0

part() {    # part NAME SECONDS SCRIPT ARGS...
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$PY" "$@" ${DRY[@]+"${DRY[@]}"} --json "$WORK/$name.json" || rc=$?
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "{\"summary\": [\"FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'));" \
             "see the log above\"]}" > "$WORK/$name.json"
    fi
}

part attention 120 benchmarks/attention.py --dtype bfloat16 --batch 1 8 --seq 1 128 \
    --windows 256 1024 --unbounded 4096 32768 --q-heads 32 --kv-heads 8 --head-dim 128
part ptx 90 benchmarks/aot_launch.py --dtype float16
part streams 150 benchmarks/streams.py --presets small base --context 128 --steps 200 --rounds 5
part threads 180 benchmarks/thread_scaling.py --preset small --cores 4 8 16 --context 128

"$PY" - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
print(f"\n{'part':<10} result")
print(f"{'-' * 10} {'-' * 60}")
for part in ("attention", "ptx", "streams", "threads"):
    try:
        lines = json.load(open(f"{work}/{part}.json"))["summary"]
    except (OSError, ValueError, KeyError) as exc:
        lines = [f"no result ({exc})"]
    for i, line in enumerate(lines or ["(nothing)"]):
        print(f"{part if i == 0 else '':<10} {line}")
PY
exit $status
