"""Weight-only quantization (`export --quant`): the graphs ONNX Runtime's quantizer writes, the
manifest, validation by token agreement and bits per byte (against the PyTorch reference and an
fp32 bundle), one-line errors, bench rows, and the TensorRT-RTX build of the int8 and int4 QDQ
graphs.

Real data: the shipped demo checkpoint (trained, with its tokenizer) and a 3.5 KB Shakespeare
excerpt (tests/data/macbeth.txt, from the public-domain corpus)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from stagcompile.demo import DEMO_DIR
from stagcompile.errors import StagError
from stagcompile.export import export_bundle
from stagcompile.runtime.bundle import Bundle

pytestmark = pytest.mark.xdist_group("quant")
TEXT = Path(__file__).parent / "data" / "macbeth.txt"
EXE = shutil.which("stagcompile", path=str(Path(sys.executable).parent))
RTX = next((m for m in ("tensorrt_rtx", "tensorrt_rtx_bindings") if importlib.util.find_spec(m)),
           None)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, flavour, quant in (("fp32", "ort", None), ("int8", "all", "int8"),
                                 ("int4", "all", "int4")):
        out[name] = export_bundle(DEMO_DIR, root / name, flavour, show_progress=False,
                                  quant=quant)
    return out


def graph_bytes(bundle: Path, flavour: str) -> int:
    return sum(f.stat().st_size for f in (bundle / "graphs" / flavour).iterdir())


def ops(path: Path) -> list:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def test_manifest_records_the_quantization(bundles):
    assert json.loads((bundles["fp32"] / "manifest.json").read_text())["quant"] is None
    m = json.loads((bundles["int4"] / "manifest.json").read_text())
    q = m["quant"]
    assert (q["weights"], q["bits"], q["block_size"], q["symmetric"]) == ("int4", 4, 32, True)
    assert set(q["formats"]) == {"ort", "portable", "plugin"}
    assert all(n > 0 for n in q["nodes_quantized"].values())
    assert "GatherBlockQuantized" in q["formats"]["ort"]
    assert m["dtype"] == "float32" and m["opset"] == 21 and q["tool"].startswith("onnxruntime")


def test_ort_graphs_hold_matmulnbits_and_are_smaller(bundles):
    for name, bits in (("int8", 8), ("int4", 4)):
        nodes = ops(bundles[name] / "graphs" / "ort" / "stack2.onnx")
        nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
        attrs = {a.name: a.i for a in nbits[0].attribute}
        assert attrs["bits"] == bits and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        assert not any(n.op_type == "MatMul" for n in nodes)      # every weight MatMul changed
        embed = {"int8": "Gather", "int4": "GatherBlockQuantized"}[name]   # no int8 Gather
        assert [n.op_type for n in nodes if n.op_type.startswith("Gather")] == [embed]
    fp32, int8, int4 = (graph_bytes(bundles[n], "ort") for n in ("fp32", "int8", "int4"))
    assert 4 * int4 < 2 * int8 < 1.2 * fp32


def test_tensorrt_graphs_hold_blockwise_int4_dequantize(bundles):
    for flavour in ("portable", "plugin"):
        model = onnx.load(str(bundles["int4"] / "graphs" / flavour / "stack1.onnx"))
        inits = {t.name: t for t in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert dq and all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in dq)
        assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
        assert len(dq[0].input) == 2                               # symmetric: no zero point
        assert next(o.version for o in model.opset_import if o.domain == "") == 21


def test_tensorrt_graphs_hold_per_channel_int8_dequantize(bundles):
    """int8 for TensorRT: each MatMul weight [K, N] is int8 with one scale per output channel
    (its accuracy: the agreement and bits-per-byte test below covers the portable graphs)."""
    import numpy as np
    from onnx import numpy_helper
    for flavour in ("portable", "plugin"):
        model = onnx.load(str(bundles["int8"] / "graphs" / flavour / "stack1.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert dq and all({a.name: a.i for a in n.attribute}["axis"] == 1 for n in dq)
        matmul_b = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
        assert {n.output[0] for n in dq} <= matmul_b
        for n in dq:
            q, scale = inits[n.input[0]], inits[n.input[1]]
            assert q.dtype == np.int8 and scale.shape == (q.shape[1],)
            assert np.abs(q).max() == 127 and len(n.input) == 2         # symmetric, full range
    m = json.loads((bundles["int8"] / "manifest.json").read_text())
    assert m["opset"] == 18 and "per output channel" in m["quant"]["formats"]["portable"]
    assert set(m["quant"]["nodes_quantized"]) == {"ort", "portable", "plugin"}


def test_validate_passes_with_agreement_and_bits_per_byte(bundles):
    from stagcompile.validate import validate_bundle
    for name in ("int8", "int4"):
        rep = validate_bundle(bundles[name], show_progress=False, text=TEXT,
                              reference=bundles["fp32"])
        assert rep.passed and not rep.checks
        assert {t["backend"] for t in rep.tokens} >= {"ort (ort)"}
        assert all(t["agreement"] >= t["minimum"] for t in rep.tokens)
        ref = rep.text["reference"]["bpb"]
        for r in rep.text["results"]:
            assert abs(r["rise"]) <= rep.text["max_rise"]    # can fall by chance, too
            assert r["bpb"] == pytest.approx(ref * (1 + r["rise"]))
    report = json.loads((bundles["int4"] / "validation" / "report.json").read_text())
    assert report["passed"] and report["text"]["results"][0]["flavour"] == "ort"
    assert "ort-portable (per-element)" in report["skipped"]


def test_bits_per_byte_of_the_fp32_bundle_is_the_reference_models(bundles):
    """The runtime's teacher-forced bits per byte equals the PyTorch reference's on the same
    rows: the quality numbers measure the model, not an artefact of the decode loop."""
    import torch

    from stagcompile import checkpoint, quality
    from stagcompile.runtime.generator import load_tokenizer
    text = TEXT.read_text()
    got = quality.bits_per_byte(bundles["fp32"], text)
    model = checkpoint.load(DEMO_DIR).eval()
    rows, n_bytes = quality.text_rows(load_tokenizer(DEMO_DIR / "tokenizer.json", 4096), text,
                                      quality.ROW_TOKENS)
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)
    nats = -logp.gather(-1, ids[:, 1:, None]).sum().item()
    assert (got["tokens"], got["bytes"]) == (rows[:, 1:].size, n_bytes)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def run(*args):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_missed_thresholds_fail_with_the_numbers(bundles):
    proc = run("validate", bundles["int4"], "--min-agreement", "1", "--text", TEXT,
               "--reference", bundles["fp32"], "--max-bpb-rise", "0.0001")
    assert proc.returncode == 1
    assert "validation failed" in proc.stderr
    out = " ".join(proc.stdout.split())
    assert "teacher-forced agreement" in out and "(minimum 100%)" in out and "FAIL" in out
    assert "bits per byte on" in out and "at most +0.0%" in out


def test_validate_needs_no_torch(bundles):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from stagcompile.validate import validate_bundle\n"
            f"r = validate_bundle({str(bundles['int8'])!r}, show_progress=False, "
            f"text={str(TEXT)!r}, reference={str(bundles['fp32'])!r})\n"
            "assert r.passed, r.to_dict()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr


def test_embedding_can_stay_unquantized(tmp_path):
    out = export_bundle(DEMO_DIR, tmp_path / "b", "ort", show_progress=False, quant="int4",
                        quant_embedding=False)
    nodes = ops(out / "graphs" / "ort" / "stack1.onnx")
    assert "Gather" in {n.op_type for n in nodes} and "GatherBlockQuantized" not in {
        n.op_type for n in nodes}
    assert "GatherBlockQuantized" not in json.loads((out / "manifest.json").read_text())[
        "quant"]["formats"]["ort"]


@pytest.mark.parametrize("kwargs, match", [
    ({"quant": "int3"}, r"--quant int3: expected one of int8, int4"),
    ({"quant": "int4", "block_size": 24}, r"--block-size 24: expected a power of two >= 16"),
    ({"quant": "int4", "flavour": "ort", "dtype": "fp16"}, r"--quant int4 with --dtype fp16"),
])
def test_bad_export_options(tmp_path, kwargs, match):
    with pytest.raises(StagError, match=match):
        export_bundle(DEMO_DIR, tmp_path / "b", show_progress=False, **kwargs)
    assert not (tmp_path / "b").exists()


def test_bad_validate_options(bundles, tmp_path):
    from stagcompile.validate import validate_bundle
    with pytest.raises(StagError, match=r"--text on .*int4.*give --reference FP32_BUNDLE"):
        validate_bundle(bundles["int4"], show_progress=False, text=TEXT)
    with pytest.raises(StagError, match=r"--reference .*int8: its weights are quantized"):
        validate_bundle(bundles["int4"], show_progress=False, text=TEXT,
                        reference=bundles["int8"])
    with pytest.raises(StagError, match=r"--reference: only used with --text"):
        validate_bundle(bundles["int4"], show_progress=False, reference=bundles["fp32"])
    with pytest.raises(StagError, match=r"--min-agreement 1.5"):
        validate_bundle(bundles["int4"], show_progress=False, min_agreement=1.5)
    with pytest.raises(StagError, match=r"missing\.txt: file not found"):
        validate_bundle(bundles["int8"], show_progress=False, text=tmp_path / "missing.txt",
                        reference=bundles["fp32"])
    (tmp_path / "short.txt").write_text("To be.")
    with pytest.raises(StagError, match=r"bits per byte needs at least 128"):
        validate_bundle(bundles["int8"], show_progress=False, text=tmp_path / "short.txt",
                        reference=bundles["fp32"])


def test_quantized_bundle_runs_through_the_cli(bundles):
    proc = run("run", bundles["int4"], "-p", "Once upon a time", "-n", "8")
    assert proc.returncode == 0, proc.stderr
    proc = run("run", bundles["int4"], "-p", "Once upon a time", "-n", "8", "--flavour",
               "portable", "--schedule", "sequential")
    assert proc.returncode == 0, proc.stderr


def test_bench_times_quantized_bundles(tmp_path):
    from stagcompile.bench import run_bench
    res = run_bench(preset_name="tiny", batches=[1], contexts=[16], windows=["unbounded"],
                    iters=2, rounds=1, warmup=1, include_torch=False, show_progress=False,
                    quant=["int8", "int4"])
    kinds = {r["kind"] for r in res["rows"]}
    assert {"staggered int8", "staggered int4", "baseline int8", "baseline int4"} <= kinds
    assert "sequential int4" not in kinds
    ratio = res["ratios"][0]
    assert ratio["int4_vs_fp32"] > 0 and ratio["int8_vs_fp32"] > 0
    assert ratio["int4_p1_vs_peer_nt"] is None                   # no --peer
    with pytest.raises(StagError, match=r"--quant int2: expected int8 and/or int4"):
        run_bench(preset_name="tiny", quant=["int2"], show_progress=False)


def test_bench_report_quant_ratios():
    from stagcompile.bench_report import cell_ratios

    def row(kind, ms, threads=(1,)):
        return {"kind": kind, "label": kind, "median_ms": ms, "threads": list(threads)}
    rows = [row("sequential", 4.0), row("staggered", 2.0, (1, 1)),
            row("staggered int4", 0.5, (1, 1)), row("baseline int4", 0.8, (2,)),
            row("peer int4", 1.2, (2,)), row("baseline", 3.0, (2,))]
    r = cell_ratios(rows)
    assert r["int4_vs_fp32"] == 4.0
    assert r["int4_p1_vs_peer_nt"] == pytest.approx(1.5)
    assert r["int4_stag_vs_peer"] == pytest.approx(2.4)
    assert r["int8_vs_fp32"] is None


@pytest.mark.skipif(RTX is None, reason="TensorRT-RTX is not installed (pip install "
                    "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tensorrt_rtx_builds_the_quantized_graphs(bundles, tmp_path, quant):
    from stagcompile.build import build_engines
    copy = tmp_path / quant
    shutil.copytree(bundles[quant], copy)
    res = build_engines(copy, show_progress=False)
    bundle = Bundle.load(copy)                                 # every checksum verifies
    assert res["flavour"] == "portable" and bundle.quant["weights"] == quant
    assert all((copy / rel).stat().st_size > 0 for rel in bundle.manifest["engines"]["files"])
