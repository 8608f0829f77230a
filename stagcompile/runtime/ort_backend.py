"""ONNX Runtime backend: one InferenceSession per stack, IOBinding over preallocated buffers.

Flavours: `ort` (the default when the bundle has it: ONNX Runtime's contrib ops, caches updated
in place by the graphs), `portable` (standard operators, ring caches the runtime commits) and
`plugin` (the attention node's onnxruntime-extensions kernel).

CPU (default): every buffer is host memory from `HostState`; each stack gets two IOBindings (one
per step parity) bound once per session, so a decode step only writes the token and position in
place and calls `run_with_iobinding`: no allocation, no rebinding. In-flight batching runs a step
on the first n rows of the session's buffers (`set_step` with n tokens): the bindings of each n
are made the first time it is used and kept. `prefill(ids, pos, rows)` runs one row's chunk on
that row's views of the caches. ONNX Runtime releases the GIL
while it runs, so the staggered schedule's worker threads really overlap.

Threading: `threads` intra-op threads per session (1 by default for the staggered schedule), one
inter-op thread, sequential execution, and `allow_spinning` off by default: an idle pool that spins
steals the core another stack's session needs (measured numbers in the README).

Huge pages (`huge_pages`, on by default): the memory ONNX Runtime allocates while it creates the
sessions (the prepacked weights) is moved onto transparent huge pages (`hugepages.py`): a step
streams every weight once, and with 4 KiB pages the TLB misses cost a measurable share of a fp32
step (README). The step buffers stay on ordinary pages: faulting in huge pages for caches that
are mostly untouched costs the first prefill more than it saves.

CUDA (onnxruntime-gpu): `providers=cuda` puts each session on the CUDA execution provider with its
own stream (`user_compute_stream`); buffers then live on the device (see `device.py`).
"""

from __future__ import annotations

import numpy as np

from . import hugepages
from .bundle import Bundle, BundleError
from .host_state import HostState


BF16_UNSUPPORTED = "bfloat16 graphs do not run on ONNX Runtime's CPU provider (no bfloat16 MatMul)"


def session_options(threads: int, spinning: bool):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def default_flavour(bundle: Bundle) -> str:
    """`ort` when the bundle has those graphs (and they can run here), else `portable`."""
    return "ort" if "ort" in bundle.flavours else "portable"


class OrtBackend:
    name = "ort"
    concurrency = "threads"
    inflight = True             # rows at their own positions, prefill of one row (inflight.py)

    def __init__(self, bundle: Bundle, threads: int | list[int] = 1, spinning: bool = False,
                 flavour: str | None = None, huge_pages: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("the ort backend needs onnxruntime: pip install onnxruntime") \
                from None
        if bundle.dtype == "bfloat16":
            raise BundleError(f"{bundle.root}: {BF16_UNSUPPORTED}; use the trt backend, or "
                              "export with --dtype fp32/fp16")
        self.bundle = bundle
        self.flavour = flavour = flavour or default_flavour(bundle)
        self.ios = [bundle.io(k + 1, flavour) for k in range(bundle.num_stacks)]
        per_stack = threads if isinstance(threads, list) else [threads] * bundle.num_stacks
        if len(per_stack) != bundle.num_stacks or min(per_stack) < 1:
            raise BundleError(f"threads {per_stack}: give one count >= 1 per stack "
                              f"({bundle.num_stacks} stacks)")
        self.threads = per_stack
        before = hugepages.snapshot() if huge_pages else None
        self.sessions = []
        for k in range(bundle.num_stacks):
            path = bundle.graph(flavour, k + 1)
            so = session_options(per_stack[k], spinning)
            if flavour == "plugin":
                from plugins.ort_kernel import session_options as with_kernel
                so = with_kernel(so)
            try:
                self.sessions.append(ort.InferenceSession(str(path), so,
                                                          providers=["CPUExecutionProvider"]))
            except Exception as exc:    # onnxruntime raises its own exception types
                raise BundleError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        self.huge_pages = hugepages.advise(before) if huge_pages else hugepages.Advice("off")
        self.state: HostState | None = None
        self.bindings: dict[tuple[int, int, int], object] = {}
        self.rows = 0

    def open(self, batch: int) -> None:
        """Allocate and bind every decode buffer for `batch` rows (once per batch size)."""
        self.rows = batch
        if self.state is not None and self.state.batch == batch:
            self.state.rings.reset()
            return
        self.state = HostState(self.ios, batch)
        self.bindings = {}

    def binding(self, k: int, parity: int):
        """Stack k's IOBinding for steps of `parity` on the first `self.rows` rows (made once per
        session and row count)."""
        key = (self.rows, k, parity)
        if key not in self.bindings:
            self.bindings[key] = self.bind(self.sessions[k], k, parity)
        return self.bindings[key]

    def bind(self, sess, k: int, parity: int):
        """An IOBinding of `sess` (stack k's graph) over the step buffers of `parity`."""
        io = sess.io_binding()
        for name, arr in self.state.feeds(k, parity, self.rows).items():
            io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for name, arr in self.state.fetches(k, parity, self.rows).items():
            io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        return io

    def run_bound(self, k: int, feeds: dict, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Run stack k on `feeds` with its cache outputs written in place (ort flavour); returns
        the other outputs, allocated by ONNX Runtime."""
        io = self.sessions[k].io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        aliased = self.state.aliased(k, rows)
        names = [t["name"] for t in self.ios[k]["outputs"]]
        for name in names:
            if name in aliased:
                arr = aliased[name]
                io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            else:
                io.bind_output(name, "cpu")
        self.sessions[k].run_with_iobinding(io)
        return {n: v.numpy() for n, v in zip(names, io.get_outputs()) if n not in aliased}

    def prefill(self, ids: np.ndarray, pos: int, rows: slice | None = None) -> np.ndarray:
        """A prompt chunk [R, S] at `pos` -> logits [R, V]. Without `rows` the chunk is the whole
        batch's and its last cross entries go to the next decode step (parity of pos + S);
        with `rows` they stay carried until `state.handoff`."""
        st = self.state
        produced, done = None, []
        for k in range(len(self.sessions)):
            feeds = st.prefill_feeds(k, ids, pos, produced, rows or slice(None))
            produced = self.run_bound(k, feeds, rows or slice(None))
            done.append((feeds, produced))
        for k, (feeds, outputs) in enumerate(done):   # after every stack read its carried entry
            st.prefill_commit(k, feeds, outputs, pos, rows or slice(None))
        if rows is None:
            st.handoff(slice(None), (pos + ids.shape[1]) % 2)
        return produced["logits"][:, -1]

    def set_step(self, tokens: np.ndarray, pos) -> None:
        """Tokens [n] of rows 0..n-1 at `pos` (one position, or one per row)."""
        self.rows = len(tokens)
        self.state.set_step(tokens, pos)

    def launch(self, k: int, parity: int) -> None:
        """Run stack k's decode step on the bound buffers, then commit its entries."""
        self.sessions[k].run_with_iobinding(self.binding(k, parity))
        self.state.commit(k, parity, self.rows)

    def finish(self) -> np.ndarray:
        return self.state.logits(self.rows)

    def sync(self) -> None:
        """Runs are synchronous on the CPU: nothing to wait for."""

    def close(self) -> None:
        self.bindings, self.state = {}, None
