"""The benchmark runs end to end on the tiny preset with few iterations: every row is measured
and the report has its structure (speed itself is not asserted: this machine is shared)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

from conftest import bundle_for
from stagcompile.bench import thread_splits
from stagcompile.bench_report import TARGETS
from stagcompile.config import preset


def test_thread_splits():
    assert thread_splits(2, 2) == [(1, 1), (2, 2)]
    assert (1, 2) in thread_splits(2, 4) and (2, 2) in thread_splits(2, 4)
    assert thread_splits(3, 2) == [(1, 1, 1), (2, 2, 2)]


def test_bench_tiny_end_to_end(tmp_path):
    exe = shutil.which("stagcompile", path=os.path.dirname(sys.executable))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    peer = importlib.util.find_spec("onnxruntime_genai") is not None
    proc = subprocess.run([exe, "bench", "--preset", "tiny", "--batch", "1,2", "--context", "8",
                           "--iters", "3", "--rounds", "2", "--warmup", "1", "--json", str(out),
                           "--plot", str(png)] + (["--peer", "ortgenai"] if peer else []),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"sequential", "staggered", "baseline", "torch", "stack"} | (
        {"peer"} if peer else set())
    assert res["meta"]["flavour"] == "ort"
    assert {(r["batch"], r["window"]) for r in res["rows"]} == {
        (1, "unbounded"), (1, "bounded"), (2, "unbounded"), (2, "bounded")}
    for r in res["rows"]:
        assert r["samples"] == 6 and r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"]
    for cell in res["ratios"]:
        for key in TARGETS:
            if key.startswith(("int8_", "int4_")):
                assert cell[key] is None, key           # no --quant
            elif key.endswith(("peer_1t", "peer_nt", "vs_peer")) and not (peer and cell["batch"] == 1):
                assert cell[key] is None, key           # the peer is measured at batch 1
            else:
                assert cell[key] > 0, key
        assert cell["ideal_step_ms"] > 0
    if peer:       # same weights: ONNX Runtime GenAI's greedy tokens are ours
        assert res["meta"]["peer_tokens"]["match"], res["meta"]["peer_tokens"]
        assert len(res["meta"]["peer_tokens"]["ours"]) >= 4     # not an empty comparison
    schedules = {(s["schedule"], s["threads_per_stack"]) for s in res["scaling"]}
    assert ("sequential", 1) in schedules and ("staggered", 1) in schedules
    assert png.stat().st_size > 1000
    assert "ratios" in proc.stdout and "thread scaling" in proc.stdout


def test_profile_step_accounts_for_every_part(bundle_root):
    """benchmarks/profile_step.py breaks a staggered step into its parts on a real bundle."""
    path, _ = bundle_for(bundle_root, preset("tiny").replace(num_stacks=3))
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_step.py")
    proc = subprocess.run([sys.executable, script, str(path), "--context", "8", "--steps", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2])
            for line in proc.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[2].strip()[:1].isdigit()}
    parts = [f"stack {k} {p}" for k in (1, 2, 3) for p in ("run", "commit")]
    for name in parts + ["set_step", "step wall", "sampling", "barrier + dispatch"]:
        assert rows[name] > 0, name
    slowest = max(rows[f"stack {k} run"] for k in (1, 2, 3))
    assert rows["step wall"] >= slowest


def test_profile_graph_reports_every_stack(bundle_root):
    """benchmarks/profile_graph.py times each stack graph against its weights-only floor and
    breaks it down by op type from ONNX Runtime's profiler."""
    path, _ = bundle_for(bundle_root, preset("tiny"))
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_graph.py")
    proc = subprocess.run([sys.executable, script, str(path), "--context", "8", "--runs", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    stacks = {row[0].strip(): [float(c) for c in row[1:]] for row in table
              if row[0].strip() in ("1", "2")}
    assert set(stacks) == {"1", "2"}
    for nodes, full_ms, weights_ms, mb, *_ in stacks.values():
        assert nodes > 10 and full_ms > 0 and weights_ms > 0 and mb > 0
    ops = {row[0].strip(): [float(c) for c in row[1:]] for row in table
           if row[0].strip() in ("MatMul", "total")}
    assert all(v > 0 for v in ops["MatMul"]) and ops["total"][0] >= ops["MatMul"][0]


def test_compare_bundles_measures_every_configuration_of_each(bundle_root, tmp_path):
    """benchmarks/compare_bundles.py runs bench's runners for two bundles in one set of rounds."""
    path, _ = bundle_for(bundle_root, preset("tiny"))
    copy = shutil.copytree(path, tmp_path / "copy")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compare_bundles.py")
    proc = subprocess.run([sys.executable, script, str(path), str(copy), "--context", "8",
                           "--iters", "2", "--rounds", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| configuration")}
    assert {"sequential 1t", "staggered 1+1", "stack 1 alone", "stack 2 alone"} <= set(rows)
    for first, second in rows.values():
        assert float(first) > 0 and float(second.split()[0]) > 0 and second.strip().endswith("x)")


def test_baseline_of_a_gated_model_has_no_gate(tmp_path):
    """A checkpoint with cross_gate (the demo's) gets a P = 1 baseline without one (a single
    stack has no cross-attention to gate)."""
    from stagcompile import checkpoint
    from stagcompile.bench import prepare_checkpoints
    from stagcompile.config import preset
    from stagcompile.model import StagFormer
    gated = checkpoint.save(StagFormer(preset("tiny").replace(cross_gate=True)), tmp_path / "g")
    out = prepare_checkpoints(gated, None, tmp_path / "work", ["unbounded"], 4)
    base = checkpoint.load_config(out["baseline"])
    assert (base.num_stacks, base.cross_gate) == (1, False)
    assert checkpoint.load_config(out["unbounded"]).cross_gate
