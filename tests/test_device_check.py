"""scripts/device_check.sh, the check for a lent GPU machine, in its CPU version (--dry-run):
every part runs (Triton kernel under the interpreter, both AOT PTX compiled, the streams
benchmark's step functions against cached decoding, ONNX Runtime thread scaling at 1 and 2 cores)
and the table lists them. The GPU parts themselves run only on the device machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_dry_run(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PY=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--dry-run",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("part       result"):]
    results = {p: json.loads((tmp_path / f"{p}.json").read_text())
               for p in ("attention", "ptx", "streams", "threads")}
    assert all(r["dry_run"] for r in results.values())
    assert results["attention"]["rows"][0]["max_err"] < 1e-5
    assert results["ptx"]["ok"] and results["streams"]["tokens_match"]
    assert [r["cores"] for r in results["threads"]["rows"]] == [1, 2][:len(os.sched_getaffinity(0))]
    for part, result in results.items():
        assert f"{part:<10} {result['summary'][0]}" in table
