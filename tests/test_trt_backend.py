"""The TensorRT backend on a CPU: engine compatibility refusals, clear errors without TensorRT or
cuda-python, dependency pins, and the pure copy arithmetic of device.py (ring commits as 2D
copies). The whole dataflow through fake CUDA and TensorRT is tests/test_gpu_dataflow.py. Real
engines on a GPU are tested under @pytest.mark.gpu."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_for, extra_requirement
from fake_gpu import greedy
from stagcompile.config import preset
from stagcompile.runtime import device, trt_backend
from stagcompile.runtime.bundle import Bundle, BundleError
from stagcompile.runtime.device import Copy2D, ring_commit_copies, seq_slice_copy
from stagcompile.runtime.rings import commit
from stagcompile.runtime.trt_backend import TrtBackend, check_engine_compat

CFG = preset("tiny").replace(num_stacks=3, cross_window=4)
GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
META = {"files": ["engines/stack1.plan"],
        "tensorrt": {"module": "tensorrt", "version": "10.9.0.34"},
        "gpu": GPU, "compute_capabilities": [[9, 0]],
        "profiles": [{"index": 0, "name": "decode", "batch": [1, 2, 4], "seq": [1, 1, 1]},
                     {"index": 1, "name": "prefill", "batch": [1, 2, 4], "seq": [1, 2, 3]}]}


# ---- compatibility -----------------------------------------------------------------------------
def test_compat_accepts_the_same_gpu_and_version():
    check_engine_compat(META, "tensorrt", "10.9.0.34", GPU["name"], (9, 0))


@pytest.mark.parametrize("module, version, name, cc, match", [
    ("tensorrt", "10.9.0.34", "NVIDIA H100 80GB HBM3", (8, 7), "compute capability 9.0"),
    ("tensorrt", "10.9.0.34", "NVIDIA H100 PCIe", (9, 0), "built on NVIDIA H100 80GB HBM3"),
    ("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0), "exact TensorRT version"),
    ("tensorrt_rtx", "10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0), "built with tensorrt"),
])
def test_compat_refuses_another_gpu_or_version(module, version, name, cc, match):
    with pytest.raises(BundleError, match=match) as err:
        check_engine_compat(META, module, version, name, cc)
    assert "stagcompile build" in str(err.value)


def test_compat_of_rtx_engines_follows_their_targets():
    rtx = dict(META, tensorrt={"module": "tensorrt_rtx_bindings", "version": "1.7.1.116"},
               gpu=None, compute_capabilities=[])
    check_engine_compat(rtx, "tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", (8, 9))
    check_engine_compat(rtx, "tensorrt_rtx", "1.7.1.116", "NVIDIA GB10", (12, 1))
    with pytest.raises(BundleError, match="default compute capabilities 8.0, 8.6, 8.9, 12.0, "
                                          "12.1, this GPU is .*2080.*explicit target"):
        check_engine_compat(rtx, "tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 2080", (7, 5))
    turing = dict(rtx, compute_capabilities=[[7, 5]])
    check_engine_compat(turing, "tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 2080", (7, 5))
    only = dict(rtx, compute_capabilities=[[12, 0]])
    with pytest.raises(BundleError, match="built for compute capabilities 12.0"):
        check_engine_compat(only, "tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", (8, 9))
    with pytest.raises(BundleError, match="no TensorRT engines"):
        check_engine_compat(None, "tensorrt", "10.9", "x", (9, 0))


@pytest.mark.parametrize("name, cc", [("NVIDIA H200", (9, 0)), ("NVIDIA B200", (10, 0)),
                                      ("Tesla V100-SXM2-16GB", (7, 0)), ("Orin", (8, 7))])
def test_rtx_engines_refuse_gpus_tensorrt_rtx_does_not_support(name, cc):
    """TensorRT-RTX targets RTX GPUs (7.5, 8.0, 8.6, 8.9, 12.0, 12.1): no Hopper, no datacenter
    Blackwell, whatever targets the manifest lists."""
    rtx = dict(META, tensorrt={"module": "tensorrt_rtx_bindings", "version": "1.7.1.116"},
               gpu=None, compute_capabilities=[])
    for meta in (rtx, dict(rtx, compute_capabilities=[list(cc)])):
        with pytest.raises(BundleError, match=r"RTX GPUs of compute capability 7\.5, 8\.0, "
                                              r"8\.6, 8\.9, 12\.0, 12\.1 only.*pip install "
                                              "tensorrt"):
            check_engine_compat(meta, "tensorrt_rtx", "1.7.1.116", name, cc)


# ---- imports and missing dependencies ----------------------------------------------------------
def test_runtime_files_import_only_what_a_bundle_has():
    allowed = {"numpy", "tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "cuda",
               "onnxruntime"}
    for name in ("trt_backend.py", "device.py", "device_state.py", "ort_cuda.py"):
        tree = ast.parse((Path(trt_backend.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                top = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                top = node.names[0].name.split(".")[0]
            else:
                continue
            assert top in allowed or top in sys.stdlib_module_names, (name, top)


def test_module_imports_without_tensorrt():
    code = ("import sys, stagcompile.runtime.trt_backend, stagcompile.runtime.ort_cuda; "
            "print(sorted(m for m in sys.modules if m.startswith(('tensorrt', 'cuda'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cuda_python_pin_stays_on_cuda_12_drivers():
    """cuda-python 13 needs an R580+ driver (JetPack 6 and CUDA 12 drivers cannot load it): the
    gpu extra resolves to 12.x; 13.x is an explicit opt-in the runtime also supports."""
    spec = extra_requirement("gpu", "cuda-python").specifier
    assert spec.contains("12.6.1") and spec.contains("12.9.4") and not spec.contains("13.0.0")


def fake_bundle(engines) -> Bundle:
    return Bundle(Path("/nonexistent"), {"engines": engines, "config": {"num_stacks": 1}})


def test_backend_without_engines_or_tensorrt_or_cuda_python(monkeypatch):
    with pytest.raises(BundleError, match="no TensorRT engines; run `stagcompile build"):
        TrtBackend(fake_bundle(None))
    monkeypatch.setattr(trt_backend, "MODULES", ("no_such_tensorrt",))
    meta = dict(META, tensorrt={"module": "no_such_tensorrt", "version": "10.9"})
    with pytest.raises(BundleError, match="needs TensorRT's Python package.*pip install tensorrt"):
        TrtBackend(fake_bundle(meta))


@pytest.mark.skipif(importlib.util.find_spec("cuda") is not None, reason="cuda-python is installed")
def test_backend_without_cuda_python_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_trt_only", types.SimpleNamespace(__version__="10.9"))
    meta = dict(META, tensorrt={"module": "fake_trt_only", "version": "10.9"})
    with pytest.raises(BundleError, match="need cuda-python.*pip install 'cuda-python>=12.6,<13'"):
        TrtBackend(fake_bundle(meta))


# ---- device.py: pure logic ---------------------------------------------------------------------
def run_copies(dst: np.ndarray, src: np.ndarray, copies: list[Copy2D]) -> None:
    """What cudaMemcpy2DAsync does, on host byte arrays (offsets relative to 0)."""
    d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    for c in copies:
        for r in range(c.height):
            d[c.dst + r * c.dpitch: c.dst + r * c.dpitch + c.width] = \
                s[c.src + r * c.spitch: c.src + r * c.spitch + c.width]


@pytest.mark.parametrize("cap, seq, pos", list(itertools.product([1, 4, 7], [1, 3, 4, 9],
                                                                 [0, 2, 5, 13])))
def test_ring_commit_copies_match_the_numpy_commit(cap, seq, pos):
    rng = np.random.default_rng(cap * 100 + seq * 10 + pos)
    ring = rng.standard_normal((2, 3, cap, 5)).astype(np.float32)   # [B, H, C, D]
    new = rng.standard_normal((2, 3, seq, 5)).astype(np.float32)    # [B, H, S, D]
    want = ring.copy()
    commit(want, new, pos)
    copies = ring_commit_copies(0, 0, rows=6, capacity=cap, seq=seq, pos=pos, row_bytes=5 * 4)
    assert len(copies) <= 2 and sum(c.width for c in copies) == min(cap, seq) * 20
    assert all(c.height == 6 and c.dpitch == cap * 20 and c.spitch == seq * 20 for c in copies)
    run_copies(ring, new, copies)
    np.testing.assert_array_equal(ring, want)


def test_decode_commit_is_one_slot_copy():
    (c,) = ring_commit_copies(1000, 5000, rows=16, capacity=64, seq=1, pos=70, row_bytes=128)
    assert c == Copy2D(dst=1000 + 6 * 128, dpitch=64 * 128, src=5000, spitch=128, width=128,
                       height=16)


def test_seq_slice_copy_and_its_range_check():
    src = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)   # [rows, L, D]
    dst = np.zeros((2, 1, 3), np.float32)
    run_copies(dst, src, [seq_slice_copy(0, 1, 0, 0, 5, 4, 1, rows=2, row_bytes=12)])
    np.testing.assert_array_equal(dst, src[:, 4:])
    with pytest.raises(ValueError, match="out of range"):
        seq_slice_copy(0, 1, 0, 0, 5, 4, 2, rows=2, row_bytes=12)


def test_check_names_the_call_and_cuda_error():
    class Err(int):
        pass

    rt = types.SimpleNamespace(cudaGetErrorName=lambda e: (0, b"cudaErrorInsufficientDriver"),
                               cudaGetErrorString=lambda e: (0, b"CUDA driver version is "
                                                                b"insufficient"))
    assert device.check(rt, (Err(0), 42), "cudaMalloc") == 42
    assert device.check(rt, (Err(0),), "cudaFree") is None
    with pytest.raises(device.DeviceError, match="cudaMalloc.*cudaErrorInsufficientDriver.*"
                                                 "insufficient"):
        device.check(rt, (Err(35), None), "cudaMalloc(64 bytes)")
    assert device.native(123) == 123 and device.align(1) == 256 and device.align(512) == 512


@pytest.mark.skipif(importlib.util.find_spec("cuda") is not None, reason="cuda-python is installed")
def test_device_count_without_cuda_python_is_an_import_error():
    with pytest.raises(ImportError, match="pip install 'cuda-python>=12.6,<13'.*R580"):
        device.device_count()
    with pytest.raises(device.DeviceError, match="need cuda-python"):
        device.Cuda()


# ---- on a GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_real_engines_match_ort_on_gpu(bundle_root, tmp_path):
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None:
        pytest.skip("needs an NVIDIA GPU with TensorRT (pip install tensorrt) and cuda-python")
    try:
        device.gpu_info()
    except device.DeviceError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    import shutil

    from stagcompile.build import build_engines
    from stagcompile.runtime.ort_backend import OrtBackend
    path, _ = bundle_for(bundle_root, CFG)
    shutil.copytree(path, tmp_path / "b")
    build_engines(tmp_path / "b", show_progress=False, module="tensorrt")
    bundle = Bundle.load(tmp_path / "b")
    prompt = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 5))
    want = greedy(OrtBackend(bundle), prompt, 10)
    for sequential in (False, True):
        backend = TrtBackend(bundle, sequential=sequential)
        np.testing.assert_allclose(greedy(backend, prompt, 10), want, atol=2e-3, rtol=0)
        if importlib.util.find_spec("triton"):          # build shipped the commit kernel
            assert backend.graphs is not None, backend.graph_note
        backend.close()


@pytest.mark.gpu
def test_ort_cuda_matches_ort_on_gpu(bundle_root):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or \
            importlib.util.find_spec("cuda") is None:
        pytest.skip("needs onnxruntime-gpu, cuda-python and an NVIDIA GPU")
    from stagcompile.runtime.ort_backend import OrtBackend
    from stagcompile.runtime.ort_cuda import OrtCudaBackend
    bundle = Bundle.load(bundle_for(bundle_root, CFG)[0])
    prompt = np.random.default_rng(7).integers(0, CFG.vocab_size, (2, 5))
    want = greedy(OrtBackend(bundle), prompt, 10)
    backend = OrtCudaBackend(bundle)
    np.testing.assert_allclose(greedy(backend, prompt, 10), want, atol=2e-3, rtol=0)
    backend.close()
