"""The benchmark runs end to end on the tiny preset with few iterations: every row is measured
and the report has its structure (speed itself is not asserted: this machine is shared)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from stagcompile.bench import thread_splits
from stagcompile.bench_report import TARGETS


def test_thread_splits():
    assert thread_splits(2, 2) == [(1, 1), (2, 2)]
    assert (1, 2) in thread_splits(2, 4) and (2, 2) in thread_splits(2, 4)
    assert thread_splits(3, 2) == [(1, 1, 1), (2, 2, 2)]


def test_bench_tiny_end_to_end(tmp_path):
    exe = shutil.which("stagcompile", path=os.path.dirname(sys.executable))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([exe, "bench", "--preset", "tiny", "--batch", "1,2", "--context", "8",
                           "--iters", "3", "--rounds", "2", "--warmup", "1", "--json", str(out),
                           "--plot", str(png)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"sequential", "staggered", "baseline", "torch", "stack"}
    assert {(r["batch"], r["window"]) for r in res["rows"]} == {
        (1, "unbounded"), (1, "bounded"), (2, "unbounded"), (2, "bounded")}
    for r in res["rows"]:
        assert r["samples"] == 6 and r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"]
    for cell in res["ratios"]:
        for key in TARGETS:
            assert cell[key] > 0, key
        assert cell["ideal_step_ms"] > 0
    schedules = {(s["schedule"], s["threads_per_stack"]) for s in res["scaling"]}
    assert ("sequential", 1) in schedules and ("staggered", 1) in schedules
    assert png.stat().st_size > 1000
    assert "ratios" in proc.stdout and "thread scaling" in proc.stdout
