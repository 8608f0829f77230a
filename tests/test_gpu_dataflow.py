"""The GPU backends' whole dataflow on a CPU, through fake CUDA / TensorRT / ONNX Runtime CUDA
provider (tests/fake_gpu.py): buffers, parities, commits, prefill chunks, hand-offs, the event
order between streams, and the CUDA graphs of the TensorRT backend (capture once per batch size,
replay at every position, device commit kernel). Every run must reproduce OrtBackend's logits."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_for
from fake_gpu import (CudaEpSession, FakeCuda, fake_engine_bundle, fake_tensorrt, greedy,
                      host_view)
from stagcompile.config import preset
from stagcompile.runtime import ort_cuda, trt_backend
from stagcompile.runtime.bundle import Bundle, BundleError
from stagcompile.runtime.device import DeviceError
from stagcompile.runtime.ort_backend import OrtBackend
from stagcompile.runtime.trt_backend import TrtBackend

pytest.importorskip("triton", reason="the device commit kernel runs under the Triton interpreter")

CFG = preset("tiny").replace(num_stacks=3, cross_window=4)
PROFILES = [{"index": 0, "name": "decode", "batch": [1, 2, 4], "seq": [1, 1, 1]},
            {"index": 1, "name": "prefill", "batch": [1, 2, 4], "seq": [1, 2, 3]}]
# which streams run as early as they can (by creation order; the others run as late as they can)
EAGER = [(), (True, False, False), (False, True, True), (True, True, True)]


@pytest.fixture(scope="module")
def exported(bundle_root):
    return bundle_for(bundle_root, CFG)[0]


@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory):
    return fake_engine_bundle(exported, tmp_path_factory.mktemp("fake") / "b", PROFILES)


@pytest.fixture(scope="module")
def want(engines):
    prompt = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 3))   # one prefill chunk
    return prompt, greedy(OrtBackend(engines), prompt, 12)


def with_fakes(monkeypatch, bundle, eager=(), capture="ok", interpret=False):
    monkeypatch.setitem(sys.modules, "fake_tensorrt", fake_tensorrt(bundle, PROFILES, capture))
    monkeypatch.setattr(trt_backend, "Cuda", functools.partial(FakeCuda, eager=eager,
                                                               interpret=interpret))


@pytest.mark.parametrize("eager", EAGER)
@pytest.mark.parametrize("sequential", [False, True])
def test_trt_graphs_replay_every_step(engines, want, monkeypatch, sequential, eager):
    """One graph per (stack, parity), captured once, replayed at every position: the ring slot
    comes from the device. Reopening reuses them."""
    prompt, expected = want
    with_fakes(monkeypatch, engines, eager)
    backend = TrtBackend(engines, sequential=sequential)
    assert backend.concurrency == "streams" and backend.max_prefill == 3
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    assert backend.graph_note.startswith("CUDA graphs on")
    assert len(backend.cuda.graphs) == 2 * CFG.num_stacks
    assert backend.cuda.graph_launches == 12 * CFG.num_stacks          # greedy steps 12 times
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    assert len(backend.cuda.graphs) == 2 * CFG.num_stacks       # same batch: no new capture
    backend.close()


def test_trt_graphs_run_the_commit_kernel_itself(engines, want, monkeypatch):
    """The same, with the Triton interpreter running plugins/ring_commit.py in the graphs."""
    prompt, expected = want
    with_fakes(monkeypatch, engines, EAGER[1], interpret=True)
    backend = TrtBackend(engines)
    np.testing.assert_allclose(greedy(backend, prompt, 6), expected[:, :6], atol=1e-5, rtol=0)
    assert backend.graphs is not None
    backend.close()


@pytest.mark.parametrize("eager", EAGER)
def test_trt_plain_enqueue_matches(engines, want, monkeypatch, eager):
    prompt, expected = want
    with_fakes(monkeypatch, engines, eager)
    backend = TrtBackend(engines, use_graphs=False)
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    assert backend.graphs is None and backend.cuda.graph_launches == 0
    backend.close()


@pytest.mark.parametrize("capture, note", [("refused", "capturing stack 1's decode step failed"),
                                           ("not-capturable", "stack 1 is not capturable")])
def test_trt_falls_back_when_capture_is_not_possible(engines, want, monkeypatch, capture, note):
    prompt, expected = want
    with_fakes(monkeypatch, engines, EAGER[1], capture)
    backend = TrtBackend(engines)
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    assert backend.graphs is None and note in backend.graph_note
    assert not backend.cuda.graphs and not backend.cuda.capturing     # nothing left behind
    assert getattr(backend.cuda, "dropped", 0) == (capture == "refused")
    backend.close()


def test_trt_without_commit_kernel_runs_without_graphs(exported, want, monkeypatch, tmp_path):
    bundle = fake_engine_bundle(exported, tmp_path / "b", PROFILES, commit_kernel=False)
    prompt, expected = want
    with_fakes(monkeypatch, bundle, EAGER[1])
    backend = TrtBackend(bundle)
    assert "no device commit kernel" in backend.graph_note
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    backend.close()


def test_trt_runs_without_graphs_when_the_commit_kernel_does_not_load(engines, want,
                                                                     monkeypatch):
    def refuse(self, ptx):
        raise DeviceError("CUDA cuModuleLoadData failed: CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    prompt, expected = want
    with_fakes(monkeypatch, engines, EAGER[1])
    monkeypatch.setattr(FakeCuda, "load_module", refuse)
    backend = TrtBackend(engines)
    assert "does not load here" in backend.graph_note and "UNSUPPORTED_PTX" in backend.graph_note
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    backend.close()


def test_trt_prefill_chunks_match_one_ort_prefill(engines, monkeypatch):
    """Prompts longer than the prefill profile run in chunks (3, 3, 2 here), which exercises
    pos > 0 prefill: head entries from pending buffers and hand-offs of odd and even chunks."""
    with_fakes(monkeypatch, engines, EAGER[2])
    prompt = np.random.default_rng(4).integers(0, CFG.vocab_size, (1, 8))
    expected = greedy(OrtBackend(engines), prompt, 6)
    np.testing.assert_allclose(greedy(TrtBackend(engines), prompt, 6), expected, atol=1e-5, rtol=0)
    backend = TrtBackend(engines)
    with pytest.raises(BundleError, match="batch 5: the engines take 1 .. 4"):
        backend.open(5)


def test_trt_refuses_a_profile_it_cannot_select(engines, monkeypatch):
    """set_optimization_profile_async reports failure by returning False (TensorRT docs)."""
    with_fakes(monkeypatch, engines)
    trt = sys.modules["fake_tensorrt"]
    context = trt.Runtime(None).deserialize_cuda_engine(b"0").create_execution_context()
    monkeypatch.setattr(type(context), "set_optimization_profile_async", lambda *a: False)
    with pytest.raises(BundleError, match="stack 1: cannot select the decode optimization "
                                          "profile 0 \\(returned False\\)"):
        TrtBackend(engines)


def test_fake_cuda_orders_streams_by_events_only():
    """The fake runs a stream's work in order, never across streams unless an event says so."""
    cu = FakeCuda()
    a, b, ev = cu.stream(), cu.stream(), cu.event()
    src, mid, dst = (np.full(4, v, np.float32) for v in (1.0, 0.0, 0.0))
    cu.copy(mid.ctypes.data, src.ctypes.data, 16, a)
    cu.copy(dst.ctypes.data, mid.ctypes.data, 16, b)         # no event: may read mid too early
    cu.sync(b)
    assert dst.sum() == 0                                   # stream a's copy has not run
    cu.copy(mid.ctypes.data, src.ctypes.data, 16, a)
    cu.record(ev, a)
    cu.wait(b, ev)
    cu.copy(dst.ctypes.data, mid.ctypes.data, 16, b)
    cu.sync(b)
    assert np.array_equal(host_view(dst.ctypes.data, (4,), np.float32), src)


# ---- ONNX Runtime with the CUDA provider --------------------------------------------------------
class FakeCudaProvider(ort_cuda.OrtCudaBackend):
    """OrtCudaBackend over fake CUDA, each session a CPU one treated as the CUDA provider treats
    it (host inputs are copied at bind time; runs follow their stream)."""
    providers_used = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def check_provider(self):
        pass

    def create_session(self, path, options, stream):
        sess = self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return CudaEpSession(sess, self.cuda, stream, self.providers_used)


@pytest.mark.parametrize("eager", [EAGER[0], EAGER[-1]])
def test_ort_cuda_feeds_every_step_its_own_tokens(engines, want, monkeypatch, eager):
    """Decode inputs are device buffers filled per step: a host array bound once would be
    copied once, at bind time, and every step would see the first token."""
    monkeypatch.setattr(ort_cuda, "Cuda", functools.partial(FakeCuda, eager=eager))
    prompt, expected = want
    backend = FakeCudaProvider(engines)
    assert backend.concurrency == "threads"
    np.testing.assert_allclose(greedy(backend, prompt, 12), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(greedy(backend, prompt[:1], 12), expected[:1], atol=1e-5, rtol=0)
    backend.close()


def test_ort_cuda_refuses_a_session_that_fell_back_to_the_cpu(engines, monkeypatch):
    monkeypatch.setattr(ort_cuda, "Cuda", FakeCuda)
    monkeypatch.setattr(FakeCudaProvider, "providers_used", ("CPUExecutionProvider",))
    with pytest.raises(BundleError, match=r"stack1\.onnx: ONNX Runtime runs this graph on "
                                          "CPUExecutionProvider, not CUDAExecutionProvider"):
        FakeCudaProvider(engines)


def test_ort_cuda_needs_the_cuda_provider():
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(BundleError, match="no CUDAExecutionProvider: pip install onnxruntime-gpu"):
        ort_cuda.OrtCudaBackend(Bundle(Path("/nonexistent"), {"config": {"num_stacks": 1}}))
