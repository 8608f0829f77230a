"""Validation with Polygraphy, and `stagcompile compile` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

from conftest import BF16_CFG, bundle_for, grouped, make_model, VARIANTS
from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.errors import StagError
from stagcompile.runtime import BundleError, Generator
from stagcompile.runtime.bundle import Bundle, sha256
from stagcompile.validate import profile_for, validate_bundle

EXE = shutil.which("stagcompile", path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("cfg", grouped([VARIANTS[-1]]))
def test_validate_passes_then_names_a_perturbed_weight(bundle_root, tmp_path, cfg):
    path, _ = bundle_for(bundle_root, cfg)
    bundle = tmp_path / "b"
    shutil.copytree(path, bundle)
    report = validate_bundle(bundle, show_progress=False)
    assert report.passed
    backends = {c.backend for c in report.checks}
    assert backends == {"ort", "ort-portable", "ort-plugin"}
    assert len(report.checks) == 3 * cfg.num_stacks
    assert {(t["backend"], t["schedule"]) for t in report.tokens} == {
        (f"ort ({f})", s) for f in ("ort", "portable") for s in ("staggered", "sequential")}
    assert "trt" in report.skipped
    saved = json.loads((bundle / "validation" / "report.json").read_text())
    assert saved["passed"] is True

    # perturb the down projection of stack 2's last MLP (the last MatMul weight of shape
    # [d_ff, d_model]): its new self entries stay exact, its cross entries for stack 3 do not
    rel = "graphs/portable/stack2.onnx"
    model = onnx.load(str(bundle / rel))
    inits = {i.name: i for i in model.graph.initializer}
    w2 = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
          and tuple(inits[n.input[1]].dims) == (cfg.d_ff, cfg.d_model)]
    init = inits[w2[-1]]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[0, 0] += 5.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    (bundle / rel).unlink()
    (bundle / (rel + ".data")).unlink()
    onnx.save_model(model, str(bundle / rel), save_as_external_data=True,
                    location="stack2.onnx.data", size_threshold=1024)
    man = json.loads((bundle / "manifest.json").read_text())
    for f in (rel, rel + ".data"):
        man["files"][f] = sha256(bundle / f)
    Bundle(bundle, man).write_manifest()

    report = validate_bundle(bundle, show_progress=False)
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert [(c.backend, c.stack) for c in failed] == [("ort-portable", 2)]
    msg = failed[0].failure
    assert msg.startswith("stack 2, output cross_out.") and "worst element" in msg
    assert "step 0 (prefill)" in msg
    assert failed[0].repro.startswith("polygraphy run ") and "--load-inputs" in failed[0].repro
    repro_inputs = failed[0].repro.split("--load-inputs ")[1].split()[0]
    assert os.path.isfile(repro_inputs)
    polygraphy = os.path.join(os.path.dirname(sys.executable), "polygraphy")
    rerun = subprocess.run([polygraphy] + failed[0].repro.split()[1:], capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode != 0, "the printed polygraphy command must reproduce the mismatch"
    assert "FAILED" in rerun.stdout + rerun.stderr
    proc = subprocess.run([EXE, "validate", str(bundle)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    assert "validation failed" in proc.stderr and "reproduce: polygraphy run" in proc.stdout


def test_validate_bf16_with_the_onnx_reference_evaluator(bundle_root):
    """ONNX Runtime's CPU provider cannot run bf16 graphs: validation says so and checks the
    portable graphs with ONNX's reference evaluator; with no portable graphs, nothing can run
    here and the command says so and exits non-zero."""
    cfg = BF16_CFG
    path, _ = bundle_for(bundle_root, cfg, dtype="bf16", flavour="portable")
    report = validate_bundle(path, show_progress=False)
    assert report.passed, [c.failure for c in report.checks]
    assert {c.backend for c in report.checks} == {"onnx-reference"}
    assert len(report.checks) == cfg.num_stacks and all(c.max_abs < 5e-2 for c in report.checks)
    assert "bfloat16" in report.skipped["ort-portable"]
    with pytest.raises(BundleError, match=r"no bfloat16 MatMul\); use the trt backend"):
        Generator.load(path)

    plugin_only, _ = bundle_for(bundle_root, cfg, dtype="bf16", flavour="plugin")
    report = validate_bundle(plugin_only, show_progress=False)
    assert not report.ran and not report.passed
    proc = subprocess.run([EXE, "validate", str(plugin_only)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    assert "nothing could be validated on this machine" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_plugin_only_bundle_skips_the_runtime_token_check(bundle_root):
    """The runtime's ONNX Runtime backend runs portable graphs: a plugin-only bundle validates its
    graphs with the plugin kernel and says why the end-to-end token check did not run."""
    path, _ = bundle_for(bundle_root, BF16_CFG, flavour="plugin")
    report = validate_bundle(path, show_progress=False)
    assert report.passed, [c.failure for c in report.checks]
    assert {c.backend for c in report.checks} == {"ort-plugin"} and not report.tokens
    assert "portable graphs" in report.skipped["greedy tokens (ort, portable)"]


def test_validate_runs_each_trt_step_on_the_profile_that_holds_it(bundle_root, tmp_path,
                                                                  monkeypatch):
    """A TrtRunner uses the optimization profile it is created with, profile 0 (decode, sequence
    1) unless given one (Polygraphy docs): the prefill step (sequence 8) must run on a runner of
    the prefill profile, decode steps on the decode one. Engines and CUDA are fakes over ONNX
    Runtime (tests/fake_gpu.py); the runtime's token check runs through them too."""
    import polygraphy.backend.trt as polygraphy_trt
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.exception import PolygraphyException

    from fake_gpu import FakeCuda, fake_engine_bundle, fake_tensorrt
    from stagcompile.runtime import trt_backend

    cfg = preset("tiny").replace(num_stacks=3, cross_window=4)
    profiles = [{"index": 0, "name": "decode", "batch": [1, 2, 4], "seq": [1, 1, 1]},
                {"index": 1, "name": "prefill", "batch": [1, 2, 4], "seq": [1, 4, 8]}]
    bundle = fake_engine_bundle(bundle_for(bundle_root, cfg)[0], tmp_path / "b", profiles)
    ran = []

    class FakeTrtRunner(OnnxrtRunner):
        def __init__(self, engine, name=None, optimization_profile=None):
            stack = int(bytes(engine()))
            super().__init__(SessionFromOnnx(str(bundle.graph("portable", stack + 1))), name)
            self.optimization_profile = optimization_profile

        def infer_impl(self, feed_dict):
            p = profiles[self.optimization_profile or 0]
            batch, seq = feed_dict["input_ids"].shape
            if not (p["batch"][0] <= batch <= p["batch"][2] and p["seq"][0] <= seq <= p["seq"][2]):
                raise PolygraphyException(f"input_ids {(batch, seq)} is outside optimization "
                                          f"profile {p['index']}")
            ran.append((seq, p["index"]))
            return super().infer_impl(feed_dict)

    fake = fake_tensorrt(bundle, profiles)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "fake_tensorrt", fake)
    monkeypatch.setattr(trt_backend, "Cuda", FakeCuda)
    monkeypatch.setattr(polygraphy_trt, "TrtRunner", FakeTrtRunner)
    monkeypatch.setattr(polygraphy_trt, "EngineFromBytes", lambda plan: lambda: plan)
    report = validate_bundle(bundle.root, show_progress=False)
    trt = [c for c in report.checks if c.backend == "trt"]
    assert len(trt) == cfg.num_stacks and all(c.passed for c in trt), [c.failure for c in trt]
    assert sorted(set(ran)) == [(1, 0), (8, 1)]
    assert [profile_for(profiles, b, q) for b, q in ((1, 1), (4, 8), (2, 9), (5, 1))] == \
        [profiles[0], profiles[1], None, None]
    assert {(t["backend"], t["schedule"], t["passed"]) for t in report.tokens} >= {
        ("trt", "staggered", True), ("trt", "sequential", True)}


def test_validate_bad_bundles(bundle_root, tmp_path):
    path, _ = bundle_for(bundle_root, preset("tiny"))
    with pytest.raises(StagError, match="manifest.json: file not found"):
        validate_bundle(tmp_path / "missing", show_progress=False)
    old = tmp_path / "old"
    shutil.copytree(path, old)
    man = json.loads((old / "manifest.json").read_text())
    man["manifest_version"] = 0
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StagError, match="manifest_version 0 is not supported.*re-export"):
        validate_bundle(old, show_progress=False)
    gone = tmp_path / "gone"
    shutil.copytree(path, gone)
    (gone / "graphs" / "plugin" / "stack1.onnx").unlink()
    with pytest.raises(StagError, match="stack1.onnx: file listed in manifest.json is missing"):
        validate_bundle(gone, show_progress=False)
    with pytest.raises(StagError, match="--atol -1"):
        validate_bundle(path, atol=-1, show_progress=False)


def test_compile_end_to_end_through_the_console_script(tmp_path):
    cfg = preset("tiny").replace(num_stacks=3, cross_window=4)
    checkpoint.save(make_model(cfg, seed=5), tmp_path / "ck")
    proc = subprocess.run([EXE, "compile", str(tmp_path / "ck"), "-o", str(tmp_path / "b"),
                           "--max-batch", "4"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "1/3 export" in out and "3/3 validate" in out and "PASSED" in out
    assert "skipped" in out                      # no TensorRT + GPU here: build says why
    assert "runtime/run.py" in out               # how to run it
    report = json.loads((tmp_path / "b" / "validation" / "report.json").read_text())
    assert report["passed"]
    run = subprocess.run([sys.executable, str(tmp_path / "b" / "runtime" / "run.py"), "--ids",
                          "1,2,3", "-n", "5"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and len(run.stdout.split()) == 5
    again = subprocess.run([EXE, "compile", str(tmp_path / "ck"), "-o", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr
