#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and TensorRT (>= 10.9 for the AOT plugin): compile a `small`
# checkpoint with the plugin flavour, validate every backend against the PyTorch reference, and
# benchmark staggered against sequential on TensorRT. Prints one short table at the end.
#
#   scripts/gpu_check.sh [WORKDIR]          (default: out/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-out/gpu_check}
PY=${PY:-.venv/bin/python}
SC=${SC:-.venv/bin/stagcompile}
[ -x "$PY" ] || { make setup >/dev/null; }

if ! "$PY" -c "import tensorrt" 2>/dev/null; then
    echo "gpu_check: TensorRT is not installed in $PY's environment (pip install tensorrt on x86_64" \
         "with an NVIDIA driver, or use JetPack's TensorRT on Jetson); nothing to check." >&2
    exit 2
fi
if ! "$PY" -c "from stagcompile.runtime.device import device_count; import sys; sys.exit(device_count() < 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible (or cuda-python missing: pip install cuda-python)." >&2
    exit 2
fi

mkdir -p "$WORK"
"$SC" init --preset small -o "$WORK/ckpt" --force
"$SC" compile "$WORK/ckpt" -o "$WORK/bundle" --flavour both --max-seq-len 1200 --force
"$SC" run "$WORK/bundle" --ids 1,2,3,4 -n 16 --backend trt --schedule staggered
"$SC" bench "$WORK/ckpt" --backend trt --batch 1,8 --context 128,1024 --window unbounded \
    --json "$WORK/bench.json"
"$PY" - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
report = json.load(open(f"{work}/bundle/validation/report.json"))
bench = json.load(open(f"{work}/bench.json"))
man = json.load(open(f"{work}/bundle/manifest.json"))
eng = man.get("engines") or {}
print(f"\nTensorRT {eng.get('tensorrt', {}).get('version')} on {eng.get('gpu', {}).get('name')}, "
      f"{eng.get('flavour')} graphs ({eng.get('reason')})")
print(f"validation: {'PASSED' if report['passed'] else 'FAILED'} "
      f"({', '.join(sorted({c['backend'] for c in report['checks']}))})")
print(f"{'batch':>5} {'ctx':>5} {'sequential ms':>14} {'staggered ms':>13} {'gain':>6} {'efficiency':>10}")
for r in bench["ratios"]:
    rows = [x for x in bench["rows"] if (x["batch"], x["context"], x["window"]) == (r["batch"], r["context"], r["window"])]
    seq = min(x["median_ms"] for x in rows if x["kind"] == "sequential")
    stag = min(x["median_ms"] for x in rows if x["kind"] == "staggered")
    print(f"{r['batch']:>5} {r['context']:>5} {seq:14.3f} {stag:13.3f} {seq / stag:6.2f} {r.get('efficiency', float('nan')):10.2f}")
PY
