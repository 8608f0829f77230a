"""`stagcompile build` on a CPU with TensorRT-RTX: engines for both profiles, manifest metadata and
checksums, the timing-cache file round trip, clear errors for bad input or a missing TensorRT, and
a cancelled or failed build that leaves the bundle as it was. Full TensorRT needs a GPU (gpu
mark)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import shutil
import types

import pytest

from conftest import bundle_for
from stagcompile import build
from stagcompile.build import (build_engines, build_limits, choose_flavour, profile_shapes,
                               profile_specs, resolve_precision)
from stagcompile.config import preset
from stagcompile.errors import StagError
from stagcompile.runtime.bundle import Bundle

CFG = preset("tiny").replace(num_stacks=3, cross_window=4)
RTX = next((m for m in ("tensorrt_rtx", "tensorrt_rtx_bindings") if importlib.util.find_spec(m)),
           None)
needs_rtx = pytest.mark.skipif(RTX is None, reason="TensorRT-RTX is not installed (pip install "
                               "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings; make test "
                               "installs it)")


@pytest.fixture(scope="module")
def exported(bundle_root):
    path, _ = bundle_for(bundle_root, CFG)
    return path


def fresh(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "bundle")
    return tmp_path / "bundle"


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    if RTX is None:
        pytest.skip("TensorRT-RTX is not installed")
    root = fresh(exported, tmp_path_factory.mktemp("built"))
    cache = root.parent / "timing.cache"
    trt = importlib.import_module(RTX)
    seen, build_network = [], trt.Builder.build_serialized_network

    def spy(self, network, config):           # the TF32 flag each engine is built with
        seen.append(config.get_flag(trt.BuilderFlag.TF32))
        return build_network(self, network, config)

    trt.Builder.build_serialized_network = spy
    try:
        result = build_engines(root, timing_cache=cache, max_prefill=16, show_progress=False,
                               module=RTX)
    finally:
        trt.Builder.build_serialized_network = build_network
    return root, cache, dict(result, tf32_at_build=seen)


@needs_rtx
def test_build_writes_engines_and_manifest(built):
    root, cache, result = built
    bundle = Bundle.load(root)                                 # every checksum verifies
    meta = bundle.manifest["engines"]
    assert meta["files"] == [f"engines/stack{k}.plan" for k in (1, 2, 3)]
    for rel in meta["files"]:
        assert (root / rel).stat().st_size > 0 and rel in bundle.manifest["files"]
        digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        assert bundle.manifest["files"][rel] == digest
    assert meta["flavour"] == "portable" and "TensorRT-RTX" in meta["reason"]
    assert meta["tensorrt"] == {"module": RTX, "version": importlib.import_module(RTX).__version__}
    assert meta["gpu"] is None and "8.0, 8.6, 8.9, 12.0, 12.1" in meta["built_for"]
    assert [(p["index"], p["name"], p["seq"]) for p in meta["profiles"]] == \
        [(0, "decode", [1, 1, 1]), (1, "prefill", [1, 8, 16])]
    assert all(p["batch"] == [1, 4, 8] for p in meta["profiles"])
    assert meta["precision"] == "float32" and meta["build_options"]["strongly_typed"]
    assert result["tf32_at_build"] == [False] * 3 and meta["build_options"]["tf32"] is False
    kernel = meta["commit_kernel"]                          # the runtime's CUDA graphs need it
    assert kernel["name"] == "ring_commit_kernel" and kernel["cc"] == 80
    assert ".entry ring_commit_kernel(" in (root / kernel["file"]).read_text()
    assert kernel["file"] in bundle.manifest["files"] and "CUDA graph" in meta["commit_kernel_note"]
    assert meta["build_options"]["max_batch"] == 8 and meta["build_options"]["max_prefill"] == 16
    assert result["flavour"] == meta["flavour"] and result["paths"][0].endswith("stack1.plan")
    assert cache.stat().st_size == result["timing_cache"]["saved_bytes"] > 0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]   # no temporary folders
    assert json.loads((root / "manifest.json").read_text())["engines"] == meta


@needs_rtx
def test_second_build_reads_the_timing_cache_back(built):
    root, cache, first = built
    size = cache.stat().st_size
    again = build_engines(root, timing_cache=cache, max_prefill=16, show_progress=False,
                          module=RTX)
    tc = again["timing_cache"]
    assert tc["loaded_bytes"] == size and tc["path"] == str(cache)
    if tc["note"]:                            # TensorRT-RTX >= 1.2: deprecated no-ops, said so
        assert "no-ops" in tc["note"] and tc["reused"] is False
    else:
        assert tc["reused"] is True
    Bundle.load(root)                         # the rebuilt engines replaced the old ones
    assert Bundle.load(root).manifest["engines"]["timing_cache"] == tc


@needs_rtx
def test_cancelled_build_leaves_the_bundle_untouched(built, tmp_path, monkeypatch):
    root = fresh(built[0], tmp_path)
    before = snapshot(root)

    def cancelled():
        ev = build.threading.Event()
        ev.set()
        return ev

    monkeypatch.setattr(build, "cancel_event", cancelled)
    with pytest.raises(KeyboardInterrupt):
        build_engines(root, show_progress=False, module=RTX)
    assert snapshot(root) == before and sorted(p.name for p in root.iterdir()) == \
        ["engines", "graphs", "manifest.json", "runtime", "validation"]


@needs_rtx
def test_parser_errors_name_the_stack_and_node(exported, tmp_path):
    root = fresh(exported, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    plugin = manifest["graphs"]["plugin"][0]["file"]           # a custom node RTX cannot map
    manifest["graphs"]["portable"][0]["file"] = plugin
    Bundle(root, manifest).write_manifest()
    with pytest.raises(StagError, match=r"stack1\.onnx: TensorRT's ONNX parser rejected stack 1: "
                                        r"node \d+ .*BoundedWindowAttention"):
        build_engines(root, show_progress=False, module=RTX)
    assert not (root / "engines").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp8"}, "--precision fp8: expected one of graph, fp32, fp16, bf16"),
    ({"max_batch": 9}, "--max-batch 9: must be 1 .. 8"),
    ({"max_batch": 0}, "--max-batch 0: must be 1 .. 8"),
    ({"max_prefill": 65}, "--max-prefill 65: must be 1 .. 64"),
    ({"workspace_mib": 0}, "--workspace 0"),
])
def test_bad_options(exported, kwargs, match):
    before = snapshot(exported)
    with pytest.raises(StagError, match=match):
        build_engines(exported, show_progress=False, module=RTX or "tensorrt", **kwargs)
    assert snapshot(exported) == before


@needs_rtx
def test_precision_other_than_the_graph_needs_reexport_on_rtx(exported):
    with pytest.raises(StagError, match="strongly typed networks only.*--dtype fp16"):
        build_engines(exported, precision="fp16", show_progress=False, module=RTX)


def test_precision_rules_per_tensorrt_version():
    flags10 = types.SimpleNamespace(FP16=1, BF16=2)
    assert resolve_precision("graph", "float32", "tensorrt", "10.9.0", flags10) == \
        {"dtype": "float32", "strongly_typed": True, "flag": None}
    assert resolve_precision("fp16", "float32", "tensorrt", "10.9.0", flags10) == \
        {"dtype": "float16", "strongly_typed": False, "flag": "FP16"}
    assert resolve_precision("bf16", "bfloat16", "tensorrt", "11.1.0", object())["flag"] is None
    with pytest.raises(StagError, match="tensorrt 11.1.0 builds strongly typed networks only"):
        resolve_precision("bf16", "float32", "tensorrt", "11.1.0", object())
    with pytest.raises(StagError, match="the graphs are float16.*--dtype fp32"):
        resolve_precision("fp32", "float16", "tensorrt", "10.9.0", flags10)


def test_missing_graph(exported, tmp_path):
    root = fresh(exported, tmp_path)
    (root / "graphs" / "portable" / "stack2.onnx").unlink()
    with pytest.raises(StagError, match=r"portable/stack2\.onnx: file listed in manifest\.json is "
                                        "missing"):
        build_engines(root, show_progress=False, module=RTX or "tensorrt")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["files"]["graphs/portable/stack2.onnx"]      # listed nowhere: the schema
    Bundle(root, manifest).write_manifest()
    with pytest.raises(StagError, match=r"field graphs.portable\[1\].file "
                                        r"'graphs/portable/stack2\.onnx' has no checksum in files"):
        build_engines(root, show_progress=False, module=RTX or "tensorrt")


def test_older_manifest_version_and_no_bundle(exported, tmp_path):
    root = fresh(exported, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(manifest | {"manifest_version": 0}))
    with pytest.raises(StagError, match="manifest_version 0 is not supported.*re-export"):
        build_engines(root, show_progress=False)
    with pytest.raises(StagError, match="file not found.*stagcompile bundle"):
        build_engines(tmp_path / "nothing", show_progress=False)


def test_no_tensorrt_says_what_is_missing(exported):
    with pytest.raises(StagError) as err:
        build_engines(exported, show_progress=False, module="no_such_tensorrt")
    msg = str(err.value)
    assert msg.startswith("no TensorRT Python module is importable (tried no_such_tensorrt: ")
    for part in ("`pip install tensorrt` (TensorRT 10.x or 11.x", "x86_64 with an NVIDIA driver",
                 "JetPack", "python3-libnvinfer",
                 "`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`"):
        assert part in msg, part
    assert msg == build.missing_message(["no_such_tensorrt"],
                                        ["no_such_tensorrt: No module named 'no_such_tensorrt'"])


def test_full_tensorrt_without_a_gpu_says_so(exported, monkeypatch):
    fake = types.SimpleNamespace(__version__="10.9.0.34", BuilderFlag=types.SimpleNamespace())
    monkeypatch.setitem(__import__("sys").modules, "fake_full_trt", fake)
    monkeypatch.setattr(build, "gpu_info", lambda: (_ for _ in ()).throw(
        build.DeviceError("cudaGetDeviceCount failed: cudaErrorNoDevice")))
    with pytest.raises(StagError, match="fake_full_trt 10.9.0.34 builds engines on the GPU that "
                                        "will run them, but no CUDA device is usable here"):
        build_engines(exported, show_progress=False, module="fake_full_trt")


def test_limits_profiles_and_flavour():
    manifest = {"max_batch": 8, "config": {"max_seq_len": 64},
                "caches": {"self": {"capacity": 64, "window": None},
                           "cross": {"capacity": 4, "window": 4}, "layout": "..."}}
    assert build_limits(manifest, None, None) == (8, 64)
    bounded = dict(manifest, caches={"self": {"capacity": 8, "window": 8},
                                     "cross": {"capacity": 4, "window": 4}})
    assert build_limits(bounded, 2, 300) == (2, 300)        # windows: any prompt length fits
    specs = profile_specs(8, 16)
    io = {"inputs": [{"name": "input_ids", "shape": ["batch", "seq"]},
                     {"name": "self.k.0", "shape": ["batch", 2, 64, 8]}]}
    assert profile_shapes(io, specs[1]) == {"input_ids": ((1, 1), (4, 8), (8, 16)),
                                            "self.k.0": ((1, 2, 64, 8), (4, 2, 64, 8),
                                                         (8, 2, 64, 8))}
    assert profile_shapes(io, specs[0])["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert choose_flavour("tensorrt_rtx", ["portable", "plugin"])[0] == "portable"
    assert "no plugin graphs" in choose_flavour("tensorrt", ["portable"])[1]
    with pytest.raises(StagError, match="only plugin graphs.*--flavour portable or both"):
        choose_flavour("tensorrt_rtx", ["plugin"])


@pytest.mark.gpu
def test_full_tensorrt_build_on_a_gpu(exported, tmp_path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("full TensorRT is not installed (pip install tensorrt on a GPU machine)")
    from stagcompile.runtime.device import DeviceError, gpu_info
    try:
        name, cc = gpu_info()
    except DeviceError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    root = fresh(exported, tmp_path)
    result = build_engines(root, show_progress=False, module="tensorrt",
                           timing_cache=tmp_path / "tc")
    meta = Bundle.load(root).manifest["engines"]
    assert meta["gpu"] == {"name": name, "compute_capability": list(cc)}
    assert result["timing_cache"]["saved_bytes"] > 0
    again = build_engines(root, show_progress=False, module="tensorrt",
                          timing_cache=tmp_path / "tc")
    assert again["timing_cache"]["reused"] is True


def test_commit_kernel_ptx_per_gpu_and_without_triton(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    entry, note = build.commit_kernel(tmp_path, [7, 5])            # Turing: sm_75 PTX
    assert entry["cc"] == 75 and ".target sm_75" in (tmp_path / "ring_commit.ptx").read_text()
    assert build.commit_kernel(tmp_path, [9, 0])[0]["cc"] == 80    # sm_80 PTX, JIT on Hopper
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    assert build.commit_kernel(tmp_path, None) == (
        None, "triton is not installed: no device commit kernel, so the runtime runs without "
              "CUDA graphs")
