"""Fakes of CUDA, TensorRT and ONNX Runtime's CUDA provider over host memory, for the GPU
backends' dataflow tests on a CPU.

FakeCuda keeps CUDA's ordering rules and nothing more: work is queued per stream; a stream runs
its queue in order; the only order between streams comes from events (`wait` makes a stream run
the recording stream up to the record first). A lazy stream runs nothing until the host waits for
its work (stream or event sync) or an event wait pulls it; an eager stream (`eager`, by creation
order) runs whatever it can at every API call. Lazy and eager streams side by side give the
extreme interleavings a GPU may produce, so a missing event wait or a host write racing a copy
shows up as wrong tokens. Copies,
kernels and engine runs read memory when they run, not when they are enqueued. Stream capture
records a stream's work into a graph instead of queuing it; launching the graph queues it again
(the engine run with the addresses it had at capture time; the device commit kernel, run by the
numpy copy of the kernel's table semantics, or the Triton interpreter running the kernel itself,
reads the position when it runs). Host syncs, records and waits during a capture are refused, as
cudaStreamCaptureModeThreadLocal refuses them. Like the CUDA API, the fake is thread-safe.

fake_tensorrt(bundle): engines are ONNX Runtime sessions over the bundle's portable graphs;
execute_async_v3 queues a run on the stream. CudaEpSession wraps a CPU session as ONNX Runtime's
CUDA provider treats it: "cuda" buffers are used in place, host buffers bound as inputs are copied
when they are bound (not when the graph runs), runs follow the stream's earlier work.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import shutil
import threading
import types
from pathlib import Path

import numpy as np

from stagcompile.runtime import trt_backend
from stagcompile.runtime.bundle import Bundle, sha256

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
TRT_VERSION = "10.9.0.34"


def host_view(ptr: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (size,))
    return raw.view(dtype).reshape(shape)


def locked(method):
    @functools.wraps(method)
    def run(self, *args):
        with self.lock:
            return method(self, *args)
    return run


class Wait:
    def __init__(self, stream: int, upto: int):
        self.stream, self.upto = stream, upto


class FakeCuda:
    """device.Cuda on host memory with CUDA's stream / event / graph semantics (module doc)."""

    owners: dict = {}                     # stream -> FakeCuda (the fake TensorRT queues via it)
    ids = itertools.count(1)

    def __init__(self, device: int = 0, eager: tuple = (), interpret: bool = False):
        self.device, self.eager_pattern, self.eager = device, list(eager), []
        self.interpret, self.lock = interpret, threading.RLock()
        self.queues: dict = {}
        self.done: dict = {}
        self.records: dict = {}
        self.capturing: dict = {}
        self.keep: dict = {}
        self.graphs: list = []
        self.graph_launches = 0

    def info(self):
        return GPU["name"], tuple(GPU["compute_capability"])

    # memory (cudaMalloc gives garbage)
    def malloc(self, size):
        self._host_call("cudaMalloc")
        buf = np.full(max(1, size), 0xAB, np.uint8)
        self.keep[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr):
        del self.keep[ptr]

    def pinned(self, shape, dtype):
        arr = np.zeros(shape, dtype)
        self.keep[arr.ctypes.data] = arr
        return arr

    # streams and events
    def stream(self):
        s = next(FakeCuda.ids)
        self.queues[s], self.done[s] = [], 0
        if len(self.queues) <= len(self.eager_pattern) and self.eager_pattern[len(self.queues) - 1]:
            self.eager.append(s)
        FakeCuda.owners[s] = self
        return s

    def event(self):
        e = next(FakeCuda.ids)
        self.records[e] = None
        return e

    @locked
    def enqueue(self, stream, op) -> None:
        if stream in self.capturing:
            self.capturing[stream].append(op)
            return
        self.queues[stream].append(op)
        self._wander()

    @locked
    def record(self, event, stream):
        self._host_call("cudaEventRecord")
        self.records[event] = (stream, len(self.queues[stream]))
        self._wander()

    @locked
    def wait(self, stream, event):
        self._host_call("cudaStreamWaitEvent")
        if self.records[event] is not None:
            self.queues[stream].append(Wait(*self.records[event]))
        self._wander()

    @locked
    def query(self, event):
        target = self.records[event]
        return target is None or self.done[target[0]] >= target[1]

    @locked
    def event_sync(self, event):
        self._host_call("cudaEventSynchronize")
        if self.records[event] is not None:
            self._run(*self.records[event])

    @locked
    def sync(self, stream):
        self._host_call("cudaStreamSynchronize")
        self._run(stream, len(self.queues[stream]))

    def _run(self, stream, upto) -> None:
        while self.done[stream] < upto:
            op = self.queues[stream][self.done[stream]]
            if isinstance(op, Wait):
                self._run(op.stream, op.upto)
            else:
                op()
            self.done[stream] += 1

    def _wander(self) -> None:
        """Run what the eager streams can run without waiting for another stream."""
        moved = True
        while moved:
            moved = False
            for s in self.eager:
                q = self.queues[s]
                while self.done[s] < len(q) and (not isinstance(q[self.done[s]], Wait) or self.done[
                        q[self.done[s]].stream] >= q[self.done[s]].upto):
                    self._run(s, self.done[s] + 1)
                    moved = True

    def _host_call(self, what: str) -> None:
        if self.capturing:
            raise AssertionError(f"{what} while stream {list(self.capturing)} is capturing")

    # copies
    def copy(self, dst, src, size, stream):
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, size))

    def copy2d(self, c, stream):
        def run():
            for r in range(c.height):
                ctypes.memmove(c.dst + r * c.dpitch, c.src + r * c.spitch, c.width)
        self.enqueue(stream, run)

    def memset_async(self, ptr, size, stream):
        self.enqueue(stream, lambda: ctypes.memset(ptr, 0, size))

    # graphs
    def begin_capture(self, stream):
        self._host_call("cudaStreamBeginCapture")
        self.capturing[stream] = []

    def end_capture(self, stream):
        return self.capturing.pop(stream)

    def drop_graph(self, graph):
        self.dropped = getattr(self, "dropped", 0) + 1

    def instantiate(self, graph):
        exe = tuple(graph)
        self.graphs.append(exe)
        return exe

    def free_graph(self, exe):
        self.graphs.remove(exe)

    @locked
    def launch_graph(self, exe, stream):
        self._host_call("cudaGraphLaunch")
        assert exe in self.graphs, "launch of a freed graph"
        self.graph_launches += 1
        for op in exe:
            self.enqueue(stream, op)

    # the device commit kernel (plugins/ring_commit.py), run by the Triton interpreter
    def load_module(self, ptx):
        assert ".entry ring_commit_kernel(" in ptx
        return "module"

    def function(self, module, name):
        assert name == "ring_commit_kernel"
        return name

    def launch(self, func, grid, block, stream, pointers, shared=0):
        import torch

        from plugins import ring_commit

        table_ptr, pos_ptr = pointers

        def run():
            table = torch.frombuffer((ctypes.c_int64 * (5 * grid[0])).from_address(table_ptr),
                                     dtype=torch.int64)
            pos = torch.frombuffer((ctypes.c_int64 * 1).from_address(pos_ptr), dtype=torch.int64)
            if self.interpret:
                ring_commit.interpreted_kernel()[tuple(grid)](table, pos, BLOCK=ring_commit.BLOCK)
                return
            for ring, new, rows, capacity, width in table.view(-1, 5).tolist():
                slot = int(pos[0]) % capacity
                for r in range(rows):
                    ctypes.memmove(ring + (r * capacity + slot) * width, new + r * width, width)
        self.enqueue(stream, run)

    def close(self):
        self.keep = {}


def fake_tensorrt(bundle: Bundle, profiles: list[dict], capture: str = "ok"):
    """A TensorRT module whose engines run the bundle's portable graphs with ONNX Runtime.
    capture: "ok", "refused" (execute_async_v3 returns False while capturing) or
    "not-capturable" (is_stream_capturable says False)."""
    import onnxruntime as ort

    np_types = {"float32": np.float32, "int64": np.int64}
    names = {"float32": "FLOAT", "int64": "INT64"}

    class Engine:
        def __init__(self, k):
            self.io = bundle.io(k + 1)
            self.infos = {t["name"]: t for t in self.io["inputs"] + self.io["outputs"]}
            self.order = list(self.infos)
            self.sess = ort.InferenceSession(str(bundle.graph("portable", k + 1)),
                                             providers=["CPUExecutionProvider"])
            self.num_io_tensors = len(self.order)

        def get_tensor_name(self, i):
            return self.order[i]

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name=names[self.infos[name]["dtype"]])

        def create_execution_context(self):
            return Context(self)

        def run(self, addr, shapes):
            feeds = {t["name"]: host_view(addr[t["name"]], shapes[t["name"]],
                                          np_types[t["dtype"]]).copy() for t in self.io["inputs"]}
            outs = [t["name"] for t in self.io["outputs"]]
            batch, seq = shapes["input_ids"]
            for name, value in zip(outs, self.sess.run(outs, feeds)):
                shape = trt_backend.shape_of(self.infos[name], batch, seq)
                host_view(addr[name], shape, value.dtype)[...] = value

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr, self.profile = engine, {}, {}, 0

        def set_optimization_profile_async(self, index, stream):
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            seq = shape[1] if name == "input_ids" else None
            self.shapes[name] = tuple(shape)
            return seq is None or seq <= profiles[self.profile]["seq"][2]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def get_tensor_shape(self, name):
            batch, seq = self.shapes["input_ids"]
            return trt_backend.shape_of(self.engine.infos[name], batch, seq)

        def is_stream_capturable(self, stream):
            return capture != "not-capturable"

        def execute_async_v3(self, stream):
            cuda = FakeCuda.owners[stream]
            if stream in cuda.capturing and capture == "refused":
                return False
            addr, shapes = dict(self.addr), dict(self.shapes)
            cuda.enqueue(stream, lambda: self.engine.run(addr, shapes))
            return True

    class ILogger:
        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(int(bytes(plan)))

    return types.SimpleNamespace(__version__=TRT_VERSION, ILogger=ILogger, Runtime=Runtime,
                                 init_libnvinfer_plugins=lambda logger, ns: True)


def fake_engine_bundle(exported: Path, dest: Path, profiles: list[dict],
                       commit_kernel: bool = True) -> Bundle:
    """A copy of an exported bundle with fake engines (their plan is the stack index), the
    device commit kernel's PTX when asked, and a manifest whose checksums verify."""
    shutil.copytree(exported, dest)
    bundle = Bundle.load(dest, verify=False)
    (dest / "engines").mkdir()
    files = []
    for k in range(bundle.num_stacks):
        (dest / "engines" / f"stack{k + 1}.plan").write_bytes(str(k).encode())
        files.append(f"engines/stack{k + 1}.plan")
    meta = {"files": files, "flavour": "portable", "tensorrt": {"module": "fake_tensorrt",
                                                                 "version": TRT_VERSION},
            "gpu": GPU, "compute_capabilities": [GPU["compute_capability"]],
            "profiles": profiles, "commit_kernel": None}
    if commit_kernel:
        from plugins import ring_commit
        kernel = ring_commit.compile_ptx()
        (dest / "engines" / "ring_commit.ptx").write_text(kernel.ptx)
        meta["commit_kernel"] = {"file": "engines/ring_commit.ptx", "name": kernel.name,
                                 "cc": kernel.cc, "num_warps": kernel.num_warps}
        files = files + [meta["commit_kernel"]["file"]]
    bundle.manifest["engines"] = meta
    bundle.manifest["files"].update({f: sha256(dest / f) for f in files})
    bundle.write_manifest()
    return Bundle.load(dest)


class CudaEpBinding:
    """An IOBinding as the CUDA provider treats it (module doc)."""

    def __init__(self, real):
        self.real, self.copies = real, []

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        if device_type == "cpu":      # host memory: copied to the device now, once
            arr = host_view(buffer_ptr, shape, element_type).copy()
            self.copies.append(arr)
            buffer_ptr = arr.ctypes.data
        else:
            assert device_type == "cuda", device_type
        self.real.bind_input(name, "cpu", 0, element_type, shape, buffer_ptr)

    def bind_output(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.real.bind_output(name, "cpu", 0, element_type, shape, buffer_ptr)


class CudaEpSession:
    """A CPU InferenceSession standing in for one on the CUDA provider, on `stream`."""

    def __init__(self, sess, cuda: FakeCuda, stream, providers=("CUDAExecutionProvider",
                                                               "CPUExecutionProvider")):
        self.sess, self.cuda, self.stream, self.providers = sess, cuda, stream, list(providers)

    def get_providers(self):
        return self.providers

    def io_binding(self):
        return CudaEpBinding(self.sess.io_binding())

    def run_with_iobinding(self, binding, run_options=None):
        self.cuda.sync(self.stream)          # a run follows the stream's earlier work
        self.sess.run_with_iobinding(binding.real, run_options)


def greedy(backend, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Logits [B, steps, V] of greedy decoding through a runtime backend (staggered schedule)."""
    from stagcompile.runtime.scheduler import Scheduler
    sched = Scheduler(backend, "staggered")
    sched.start(prompt.shape[0])
    logits, out = sched.prefill(prompt), []
    for _ in range(steps):
        out.append(np.array(logits))
        logits = sched.step(logits.argmax(-1))
    return np.stack(out, 1)
