"""ONNX Runtime on a GPU: one CUDAExecutionProvider session per stack, each on its own CUDA stream.

Used when onnxruntime-gpu and an NVIDIA GPU are present. Same interface as `OrtBackend`
(concurrency "threads": the scheduler runs stack k on worker thread k and meets at a barrier) and
the same dataflow as `HostState`, with the decode state on the device (`device.DeviceState`):

    per stack k      InferenceSession (CUDA EP, user_compute_stream = stream k; refused when
                     ONNX Runtime fell back to the CPU: `get_providers()` is checked); two
                     IOBindings (step parity 0 / 1) bound once per batch size, every buffer on
                     the device (`bind_input(name, "cuda", 0, dtype, shape, ptr)`): rings,
                     pending, staging, and the step input [tokens | pos]
    launch(k, p)     H2D of the step input (pinned) on stream k -> run_with_iobinding (ORT
                     synchronizes its stream when a run ends) -> commit new_self.* and
                     pending[k][p] into the rings (cudaMemcpy2DAsync, one slot) -> last stack:
                     D2H of the logits -> synchronize stream k, so after the barrier the next
                     step's graphs see every commit and every pending buffer written
    prefill          stacks in order on the prompt, outputs in device scratch, the consumer's
                     cross_in assembled on the device, last cross entries handed off at the end

IOBinding copies an input bound in host memory to the device once, when it is bound (ONNX Runtime
I/O binding docs): a host `input_ids` bound once would feed every decode step the first token.
So decode inputs are device buffers filled by a copy per step; prefill binds afresh per call.

Only numpy, onnxruntime-gpu and cuda-python are needed.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle, BundleError
from .device import Cuda, align, native, seq_slice_copy
from .device_state import DeviceState
from .ort_backend import session_options
from .rings import shape_of

ELEMENT = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
           "bfloat16": 16}     # ONNX TensorProto.BFLOAT16: numpy has no bfloat16


def check_on_gpu(sess, path):
    """`sess` when ONNX Runtime put it on the CUDA execution provider; it silently falls back to
    the CPU when that provider cannot load (missing or mismatched CUDA / cuDNN libraries)."""
    used = sess.get_providers()
    if not used or used[0] != "CUDAExecutionProvider":
        raise BundleError(f"{path}: ONNX Runtime runs this graph on {', '.join(used) or 'nothing'}"
                          ", not CUDAExecutionProvider: its CUDA provider did not load (CUDA or "
                          "cuDNN libraries missing, or of another major version than "
                          "onnxruntime-gpu was built for; ONNX Runtime's log says which)")
    return sess


class OrtCudaBackend:
    name = "ort-cuda"
    concurrency = "threads"

    def __init__(self, bundle: Bundle, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("the ort-cuda backend needs onnxruntime-gpu: pip install "
                              "onnxruntime-gpu (matching your CUDA major version)") from None
        self.ort = ort
        self.check_provider()
        self.bundle, self.cuda = bundle, Cuda()
        try:
            self.ios = [bundle.io(k + 1) for k in range(bundle.num_stacks)]
            self.streams = [self.cuda.stream() for _ in self.ios]
            self.sessions = []
            for k, stream in enumerate(self.streams):
                path = bundle.graph("portable", k + 1)
                try:
                    sess = self.create_session(path, session_options(threads, False), stream)
                except Exception as exc:          # onnxruntime raises its own exception types
                    raise BundleError(f"{path}: ONNX Runtime (CUDA) cannot load it: {exc}") \
                        from None
                self.sessions.append(check_on_gpu(sess, path))
        except BaseException:
            self.cuda.close()
            raise
        self.vocab = bundle.config["vocab_size"]
        self.state: DeviceState | None = None
        self.bindings: list[list] = []

    def check_provider(self) -> None:
        if "CUDAExecutionProvider" not in self.ort.get_available_providers():
            raise BundleError("this onnxruntime has no CUDAExecutionProvider: pip install "
                              "onnxruntime-gpu (not onnxruntime) and use a machine with an "
                              "NVIDIA GPU, or use the ort backend on the CPU")

    def create_session(self, path, options, stream):
        return self.ort.InferenceSession(str(path), options, providers=self.providers(stream))

    def providers(self, stream) -> list:
        return [("CUDAExecutionProvider", {"device_id": self.cuda.device,
                                           "user_compute_stream": str(native(stream)),
                                           "do_copy_in_default_stream": "1"})]

    def _bind(self, k: int, inputs: dict, outputs: dict, shapes: dict, host: dict):
        """An IOBinding of stack k: `host` inputs are numpy arrays (copied to the device now, at
        bind time), the others device pointers."""
        io, dev = self.sessions[k].io_binding(), self.cuda.device
        infos = {t["name"]: t for t in self.ios[k]["inputs"] + self.ios[k]["outputs"]}
        for name, arr in host.items():
            io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for bind, table in ((io.bind_input, inputs), (io.bind_output, outputs)):
            for name, ptr in table.items():
                if name not in host:
                    bind(name, "cuda", dev, ELEMENT[infos[name]["dtype"]],
                         shapes[name], ptr)
        return io

    def open(self, batch: int) -> None:
        """Allocate, zero and bind every decode buffer for `batch` rows (once per batch size)."""
        if self.state is None or self.state.batch != batch:
            if self.state is not None:
                self.state.free()
            self.state = ds = DeviceState(self.cuda, self.ios, batch)
            pos_off = align(8 * batch)       # step bytes: tokens int64 [B] | pad | pos int64 [B]
            self.host_step = self.cuda.pinned((pos_off + 8 * batch,), np.uint8)
            self.tokens = self.host_step[: 8 * batch].view(np.int64)
            self.pos = self.host_step[pos_off:].view(np.int64)
            self.step_dev = [ds.scratch(("step", k), self.host_step.nbytes)
                             for k in range(len(self.ios))]
            self.logits = self.cuda.pinned((batch, 1, self.vocab), np.float32)   # [B, 1, V]
            self.last = self.cuda.pinned((batch, self.vocab), np.float32)        # [B, V]
            self.bindings = []
            for k, io in enumerate(self.ios):
                shapes = {t["name"]: shape_of(t, batch, 1) for t in io["inputs"] + io["outputs"]}
                step = {"input_ids": self.step_dev[k], "pos": self.step_dev[k] + pos_off}
                self.bindings.append([self._bind(k, {**ds.inputs(k, p), **step},
                                                 ds.outputs(k, p), shapes, {}) for p in (0, 1)])
        self.state.reset(self.streams[0])
        self.cuda.sync(self.streams[0])
        self.step_pos = 0

    def prefill(self, ids: np.ndarray, pos: int) -> np.ndarray:
        """Prompt [B, T] -> logits of its last position [B, V]: stacks in order."""
        cu, ds = self.cuda, self.state
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        host = {"input_ids": ids, "pos": np.full((batch,), pos, np.int64)}
        produced, handoff = {}, []
        for k, (sess, io) in enumerate(zip(self.sessions, self.ios)):
            s = self.streams[k]
            out = ds.prefill_buffers(k, seq, pos, produced, s)
            cu.sync(s)                                # cross_in assembled before ORT reads it
            shapes = {t["name"]: shape_of(t, batch, seq) for t in io["inputs"] + io["outputs"]}
            inputs = {**ds.rings[k], **{n: out[n] for n in out if n.startswith("cross_in.")}}
            outputs = {t["name"]: out[t["name"]] for t in io["outputs"]}
            sess.run_with_iobinding(self._bind(k, inputs, outputs, shapes, host))
            handoff += ds.prefill_commit(k, {**inputs, **outputs}, seq, pos, s)
            cu.sync(s)
            produced = out
        for c in handoff:      # after every stack: pending[k][(pos+seq) % 2] may be [pos % 2]
            cu.copy2d(c, self.streams[0])
        last = self.last                              # logits [B, seq, V] -> [B, V] at seq-1
        cu.copy2d(seq_slice_copy(last.ctypes.data, 1, 0, produced["logits"], seq, seq - 1, 1,
                                 batch, self.vocab * 4), self.streams[0])
        cu.sync(self.streams[0])
        return last.copy()

    def set_step(self, tokens: np.ndarray, pos: int) -> None:
        """Write the step input into pinned memory (every launch of the previous step ended with
        a sync of its stream, so no copy of it is in flight)."""
        self.tokens[:] = tokens
        self.pos.fill(pos)
        self.step_pos = pos

    def launch(self, k: int, parity: int) -> None:
        """Upload the step input, run stack k's decode step on the bound buffers, commit its
        entries (last stack: fetch the logits), wait for all of it."""
        cu, s = self.cuda, self.streams[k]
        cu.copy(self.step_dev[k], self.host_step.ctypes.data, self.host_step.nbytes, s)
        self.sessions[k].run_with_iobinding(self.bindings[k][parity])
        self.state.commit(k, parity, self.step_pos, s)
        if k == len(self.ios) - 1:
            cu.copy(self.logits.ctypes.data, self.state.staging[k]["logits"], self.logits.nbytes,
                    s)
        cu.sync(s)

    def finish(self) -> np.ndarray:
        return self.logits[:, -1]                     # [B, 1, V] -> [B, V]

    def close(self) -> None:
        if self.cuda is not None:
            self.bindings, self.sessions, self.state = [], [], None
            self.cuda.close()
            self.cuda = None
