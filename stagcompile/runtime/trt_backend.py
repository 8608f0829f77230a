"""TensorRT backend: one engine per stack, every stack's decode step on its own CUDA stream.

Same interface and dataflow as `OrtBackend` + `HostState`, with every buffer on the device
(`device_state.DeviceState`: rings, staging, pending[k][p], allocated once per batch size):

    per stack k     engine; context "decode" (profile 0, seq 1) and "prefill" (profile 1);
                    a non-blocking stream; step input [tokens | pos] (one H2D copy per step)

launch(k, p) enqueues on stream k, without a host sync: H2D of the step input -> wait for the
producer's step-(i-1) write of pending[k][p] (event written[k-1][1-p]) and for the consumer's
step-(i-1) commit of pending[k+1][1-p] (event consumed[k+1][1-p]) -> execute_async_v3 (reads
pending[k][p], writes cross_out.* into pending[k+1][1-p]) -> record written[k][p] -> commit
new_self.* and pending[k][p] into the rings at slot pos % C (cudaMemcpy2DAsync, B*H rows of D
elements) -> record consumed[k][p] -> last stack: D2H of the logits, record logits_ready[p].
So no graph reads memory a concurrent graph writes. finish() waits for logits_ready[p] only.
`sequential=True` puts every stack on one stream (stream order replaces the events).

CUDA graphs. A step's device work does not depend on the position except through the ring slot,
so with the bundle's device commit kernel (`engines.commit_kernel`, plugins/ring_commit.py: one
launch commits every ring of a stack at slot pos mod C, reading pos from the step input on the
GPU) each (stack, parity) step is captured once per batch size as a CUDA graph: enqueue ->
commit kernel -> (last stack) D2H of the logits. launch() then issues the upload, the waits, one
cudaGraphLaunch and the records. Capture follows trtexec: addresses set, one ordinary enqueue and
a sync first, cudaStreamCaptureModeThreadLocal, and a failed enqueue or invalidated capture ends
the capture and clears the error. Where a graph cannot be made (no commit kernel in the bundle,
`is_stream_capturable` false, capture failed) every step uses the plain path above;
`graph_note` says which and why.

Engines are tied to the TensorRT version and the GPU: `check_engine_compat` compares
manifest["engines"] with this machine before anything is deserialized. Only numpy, TensorRT (or
TensorRT-RTX) and cuda-python are needed.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

from .bundle import Bundle, BundleError
from .device import Cuda, DeviceError, align, native, seq_slice_copy
from .device_state import DeviceState
from .rings import shape_of

MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
RTX_MODULES = ("tensorrt_rtx", "tensorrt_rtx_bindings")
# TensorRT-RTX runs on RTX GPUs only (trt.ComputeCapability: SM75, SM80, SM86, SM89, SM120, SM121;
# no Hopper 9.x, no datacenter Blackwell 10.x). Engines built without an explicit target run on
# all but Turing, which needs one (TensorRT-RTX docs, "CPU-Only AOT and TensorRT-RTX Engines").
RTX_SUPPORTED_CC = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
RTX_DEFAULT_CC = RTX_SUPPORTED_CC[1:]
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
              "INT32": "int32"}


def family(module: str) -> str:
    return "tensorrt_rtx" if module in RTX_MODULES else "tensorrt"


def import_trt(preferred: str | None = None):
    """(module, name): `preferred` first, then MODULES of the same family, then the rest."""
    order = ([preferred] if preferred else []) + sorted(
        MODULES, key=lambda m: preferred is None or family(m) != family(preferred))
    errors = []
    for name in dict.fromkeys(order):
        try:
            return importlib.import_module(name), name
        except (ImportError, OSError) as exc:
            errors.append(f"{name}: {exc}")
    raise BundleError("the trt backend needs TensorRT's Python package, and none imports ("
                      + "; ".join(errors) + "). Install TensorRT 10.x/11.x (pip install tensorrt; "
                      "JetPack's on Jetson) or TensorRT-RTX, plus cuda-python")


def make_logger(trt, echo_severity: int = 1):
    """A trt.ILogger that keeps warnings and errors and prints those at `echo_severity` or worse
    (0 internal error, 1 error, 2 warning, 3 info, 4 verbose)."""
    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.records: list[tuple[int, str]] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= 2:
                self.records.append((level, msg))
            if level <= echo_severity:
                print(f"[TensorRT] {msg}", file=sys.stderr)

        def errors(self) -> list[str]:
            return [m for lvl, m in self.records if lvl <= 1]

    return RecordingLogger()


def check_engine_compat(meta: dict | None, module: str, version: str, gpu_name: str,
                        compute_capability) -> None:
    """Refuse engines this machine cannot run; BundleError says what differs and what to do."""
    if not meta:
        raise BundleError("this bundle has no TensorRT engines; run `stagcompile build BUNDLE` on "
                          "the target GPU first")
    built = meta.get("tensorrt", {})
    rebuild = "rebuild them here with `stagcompile build BUNDLE`"
    if family(built.get("module", "tensorrt")) != family(module):
        raise BundleError(f"the engines were built with {built.get('module')} "
                          f"{built.get('version')}, but this runtime uses {module} {version}; "
                          f"{rebuild}")
    if built.get("version") != version:
        raise BundleError(f"the engines were built with {built.get('module')} "
                          f"{built.get('version')}, this machine has {module} {version} (engines "
                          f"are tied to the exact TensorRT version); {rebuild}")
    cc = tuple(int(x) for x in compute_capability)
    here = f"{gpu_name} (compute capability {cc[0]}.{cc[1]})"
    gpu = meta.get("gpu")
    if gpu:
        want = tuple(int(x) for x in gpu["compute_capability"])
        if want != cc:
            raise BundleError(f"the engines were built for compute capability {want[0]}.{want[1]} "
                              f"({gpu.get('name')}), this GPU is {here}; {rebuild}")
        if gpu.get("name") != gpu_name:
            raise BundleError(f"the engines were built on {gpu.get('name')}, this GPU is {here} "
                              f"(engines are specific to the GPU model); {rebuild}")
        return
    if cc not in RTX_SUPPORTED_CC:
        raise BundleError(f"TensorRT-RTX engines run on RTX GPUs of compute capability "
                          f"{cc_list(RTX_SUPPORTED_CC)} only, this GPU is {here}; use full "
                          "TensorRT here (pip install tensorrt) and `stagcompile build BUNDLE`")
    targets = [tuple(int(x) for x in t) for t in meta.get("compute_capabilities") or []]
    if cc not in (targets or RTX_DEFAULT_CC):
        kind = "" if targets else "TensorRT-RTX's default "
        raise BundleError(f"the engines were built for {kind}compute capabilities "
                          f"{cc_list(targets or RTX_DEFAULT_CC)}, this GPU is {here}; {rebuild}"
                          + ("" if targets else " for an explicit target"))


def cc_list(ccs) -> str:
    return ", ".join(f"{a}.{b}" for a, b in ccs)


def profile_of(meta: dict, name: str) -> dict:
    for p in meta.get("profiles", []):
        if p["name"] == name:
            return p
    raise BundleError(f"manifest engines have no {name!r} optimization profile; rebuild the "
                      "engines with this stagcompile")


class TrtBackend:
    name = "trt"
    concurrency = "streams"

    def __init__(self, bundle: Bundle, sequential: bool = False, use_graphs: bool = True):
        meta = bundle.manifest.get("engines")
        if not meta:
            bundle.engine(1)                       # raises the "run stagcompile build" error
        trt, module = import_trt(meta["tensorrt"]["module"])
        self.trt, self.cuda = trt, Cuda()
        try:
            self._setup(bundle, meta, module, sequential, use_graphs)
        except BaseException:
            self.close()
            raise

    def _setup(self, bundle: Bundle, meta: dict, module: str, sequential: bool,
               use_graphs: bool) -> None:
        trt = self.trt
        gpu_name, cc = self.cuda.info()
        check_engine_compat(meta, module, trt.__version__, gpu_name, cc)
        self.bundle, self.sequential = bundle, sequential
        self.ios = [bundle.io(k + 1) for k in range(bundle.num_stacks)]
        self.num_stacks = len(self.ios)
        self.decode_profile = profile_of(meta, "decode")
        self.prefill_profile = profile_of(meta, "prefill")
        self.max_batch = self.decode_profile["batch"][2]
        self.max_prefill = self.prefill_profile["seq"][2]
        self.logger = make_logger(trt)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = trt.Runtime(self.logger)
        self.engines = [self._load(k) for k in range(self.num_stacks)]
        n = 1 if sequential else self.num_stacks
        streams = [self.cuda.stream() for _ in range(n)]
        self.streams = streams * self.num_stacks if sequential else streams
        self.decode = [self._context(k, self.decode_profile) for k in range(self.num_stacks)]
        self.prefill_ctx = [self._context(k, self.prefill_profile) for k in range(self.num_stacks)]
        ev, P, cu = self.cuda.event, self.num_stacks, self.cuda
        self.written = [[ev(), ev()] for _ in range(P)]
        self.consumed = [[ev(), ev()] for _ in range(P)]
        self.logits_ready = [ev(), ev()]
        self.uploaded = [[ev() for _ in range(P)] for _ in range(P + 1)]   # [slot][stack]
        # pinned host memory at max_batch, once: step slots [tokens | pad | pos], logits
        self.pos_off = align(8 * self.max_batch)
        self.host_steps = cu.pinned((P + 1, self.pos_off + 8 * self.max_batch), np.uint8)
        vocab = bundle.config["vocab_size"]
        self.host_logits = cu.pinned((2, self.max_batch, vocab), np.float32)  # [parity, B, V]
        self.host_prefill = cu.pinned((self.max_batch, vocab), np.float32)
        self.host_prompt = cu.pinned((self.max_batch * (self.max_prefill + 1),), np.int64)
        self.session: dict | None = None
        self.state: DeviceState | None = None
        self.graphs: list | None = None
        self.commit_fn, self.graph_note = self._commit_kernel(meta, use_graphs)

    # ---- loading -------------------------------------------------------------------------------
    def _load(self, k: int):
        path = self.bundle.engine(k + 1)
        plan = path.read_bytes()
        if hasattr(self.runtime, "get_engine_validity"):      # TensorRT-RTX preflight
            validity, diagnostics = self.runtime.get_engine_validity(plan)
            if validity == self.trt.EngineValidity.INVALID:
                raise BundleError(f"{path}: TensorRT-RTX reports the engine invalid on this "
                                  f"machine (diagnostics bits {int(diagnostics):#x}); rebuild it")
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            log = " | ".join(self.logger.errors()[-3:]) or "no message"
            raise BundleError(f"{path}: TensorRT cannot deserialize the engine ({log}); rebuild "
                              "it with `stagcompile build` on this machine")
        io = self.ios[k]
        have = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        want = {t["name"]: t for t in io["inputs"] + io["outputs"]}
        if have != set(want):
            raise BundleError(f"{path}: engine tensors {sorted(have ^ set(want))} differ from the "
                              f"manifest's I/O table of stack {k + 1}; rebuild the engines")
        for name, t in want.items():
            got = TRT_DTYPES.get(engine.get_tensor_dtype(name).name, "?")
            if got != t["dtype"]:
                raise BundleError(f"{path}: tensor {name} is {got} in the engine but {t['dtype']} "
                                  "in the manifest; rebuild the engines")
        return engine

    def _commit_kernel(self, meta: dict, use_graphs: bool):
        """(the device commit kernel's CUfunction, None) or (None, why CUDA graphs are off)."""
        kernel = meta.get("commit_kernel")
        if not use_graphs:
            return None, "CUDA graphs off (use_graphs=False)"
        if not kernel:
            return None, ("CUDA graphs off: the bundle has no device commit kernel (build the "
                          "engines with triton installed)")
        path = self.bundle.root / kernel["file"]
        if not path.is_file():
            raise BundleError(f"{path}: the device commit kernel listed in the manifest is missing")
        try:
            function = self.cuda.function(self.cuda.load_module(path.read_text()), kernel["name"])
        except DeviceError as exc:          # e.g. PTX newer than this driver
            return None, f"CUDA graphs off: the device commit kernel does not load here ({exc})"
        self.commit_block = 32 * kernel["num_warps"]
        return function, None

    def _context(self, k: int, profile: dict):
        ctx = self.engines[k].create_execution_context()
        if ctx is None:
            raise BundleError(f"stack {k + 1}: cannot create a TensorRT execution context (out "
                              f"of GPU memory?): {' | '.join(self.logger.errors()[-2:])}")
        try:
            ok, why = ctx.set_optimization_profile_async(profile["index"],
                                                         native(self.streams[k])), "returned False"
        except RuntimeError as exc:
            ok, why = False, str(exc)
        if not ok:
            raise BundleError(f"stack {k + 1}: cannot select the {profile['name']} optimization "
                              f"profile {profile['index']} ({why}); rebuild the engines")
        self.cuda.sync(self.streams[k])
        return ctx

    def _bind(self, ctx, k: int, shapes: dict, addresses: dict, what: str) -> None:
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise BundleError(f"stack {k + 1} {what}: input {name} shape {shape} is outside "
                                  "the engine's optimization profile (see manifest engines."
                                  "profiles)")
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise BundleError(f"stack {k + 1} {what}: cannot bind {name}")

    def _execute(self, ctx, k: int, stream, what: str) -> None:
        if not ctx.execute_async_v3(native(stream)):
            raise BundleError(f"stack {k + 1} {what}: execute_async_v3 failed: "
                              f"{' | '.join(self.logger.errors()[-3:])}")

    # ---- session -------------------------------------------------------------------------------
    def open(self, batch: int) -> None:
        """Allocate, zero and bind every decode buffer for `batch` rows (once per batch size)."""
        if not 1 <= batch <= self.max_batch:
            raise BundleError(f"batch {batch}: the engines take 1 .. {self.max_batch}")
        self._sync_all()
        if self.state is None or self.state.batch != batch:
            self._free_session()
            self._allocate(batch)
        self.state.reset(self.streams[0])
        self.session["slot"], self.session["pos"] = 0, 0
        self._settle()

    def _allocate(self, batch: int) -> None:
        cu, P = self.cuda, self.num_stacks
        self.state = ds = DeviceState(cu, self.ios, batch)
        st: dict = {"batch": batch, "step_bytes": self.pos_off + 8 * batch, "bind": []}
        st["step_dev"] = [ds.scratch(("step", k), st["step_bytes"]) for k in range(P)]
        # per slot: bytes [pos_off + 8*max_batch] -> tokens int64 [B] at 0, pos int64 [B] at pos_off
        st["tokens"] = [row[: 8 * batch].view(np.int64) for row in self.host_steps]
        st["pos_host"] = [row[self.pos_off: self.pos_off + 8 * batch].view(np.int64)
                          for row in self.host_steps]
        st["logits"] = self.host_logits[:, :batch]                    # [parity, B, V]
        self.session = st
        for k, io in enumerate(self.ios):
            shapes = {t["name"]: shape_of(t, batch, 1) for t in io["inputs"]}
            fixed = {"input_ids": st["step_dev"][k], "pos": st["step_dev"][k] + self.pos_off,
                     **ds.rings[k], **ds.staging[k]}
            self._bind(self.decode[k], k, shapes, fixed, "decode")
            parity = [list({**ds.pending[k][p], **ds.outputs(k, p)}.items()) for p in (0, 1)]
            st["bind"].append([[(n, a) for n, a in pairs if n not in fixed] for pairs in parity])
            self._bind(self.decode[k], k, {}, dict(st["bind"][k][0]), "decode")
            self._check_outputs(k, batch)
        if self.commit_fn is not None:
            self.graphs, self.graph_note = self._capture_graphs()

    def _capture_graphs(self) -> tuple[list | None, str]:
        """One CUDA graph per (stack, parity), or (None, why not) when one cannot be made."""
        cu, st, ds = self.cuda, self.session, self.state
        tables = ds.commit_tables(self.streams[0])
        for k, s in enumerate(self.streams):        # the warm-up enqueue reads a valid step
            cu.memset_async(st["step_dev"][k], st["step_bytes"], s)
            cu.sync(s)
        for k, (ctx, s) in enumerate(zip(self.decode, self.streams)):
            if hasattr(ctx, "is_stream_capturable") and not ctx.is_stream_capturable(native(s)):
                return None, f"CUDA graphs off: TensorRT says stack {k + 1} is not capturable"
        graphs = [[None, None] for _ in range(self.num_stacks)]
        for k, (ctx, s) in enumerate(zip(self.decode, self.streams)):
            for parity in (0, 1):
                for name, ptr in st["bind"][k][parity]:
                    ctx.set_tensor_address(name, ptr)
                self._execute(ctx, k, s, "decode (before graph capture)")
                cu.sync(s)
                cu.begin_capture(s)
                try:
                    ok = ctx.execute_async_v3(native(s))
                    if ok:
                        self._device_commit(k, tables[k][parity], s)
                        if k == self.num_stacks - 1:
                            self._logits_copy(parity, s)
                finally:
                    graph = cu.end_capture(s)
                if not ok or graph is None:
                    if graph is not None:
                        cu.drop_graph(graph)
                    self._sync_all()
                    for exe in filter(None, sum(graphs, [])):
                        cu.free_graph(exe)
                    log = " | ".join(self.logger.errors()[-2:]) or "no message"
                    return None, (f"CUDA graphs off: capturing stack {k + 1}'s decode step "
                                  f"failed ({log})")
                graphs[k][parity] = cu.instantiate(graph)
        self._sync_all()
        return graphs, "CUDA graphs on: one per (stack, parity)"

    def _device_commit(self, k: int, table: int, stream) -> None:
        """Commit every ring of stack k at slot pos % C, pos read on the device."""
        rows = self.state.tables_host[k][0][:, 2]
        pos = self.session["step_dev"][k] + self.pos_off
        self.cuda.launch(self.commit_fn, (len(rows), int(rows.max())), self.commit_block, stream,
                         (table, pos))

    def _logits_copy(self, parity: int, stream) -> None:
        host = self.session["logits"][parity]
        self.cuda.copy(host.ctypes.data, self.state.staging[-1]["logits"], host.nbytes, stream)

    def _check_outputs(self, k: int, batch: int) -> None:
        ctx = self.decode[k]
        for t in self.ios[k]["outputs"]:
            got, want = tuple(ctx.get_tensor_shape(t["name"])), shape_of(t, batch, 1)
            if got != want:
                raise BundleError(f"stack {k + 1}: engine output {t['name']} has shape {got} at "
                                  f"batch {batch}, the manifest says {want}; rebuild the engines")

    def _sync_all(self) -> None:
        for s in dict.fromkeys(map(native, self.streams)):
            self.cuda.sync(s)

    def sync(self) -> None:
        """Wait for everything enqueued (timing runs of a single stack)."""
        self._sync_all()

    def _settle(self) -> None:
        """After a host sync: give every step event a completed record on its stream."""
        self._sync_all()
        for k, s in enumerate(self.streams):
            for ev in self.written[k] + self.consumed[k] + [slot[k] for slot in self.uploaded]:
                self.cuda.record(ev, s)
        for ev in self.logits_ready:
            self.cuda.record(ev, self.streams[-1])
        self._sync_all()

    def _free_session(self) -> None:
        if self.state is not None:
            self._sync_all()
            for exe in sum(self.graphs or [], []):
                self.cuda.free_graph(exe)
            self.state.free()
            self.state = self.session = self.graphs = None

    # ---- prefill -------------------------------------------------------------------------------
    def prefill(self, ids: np.ndarray, pos: int) -> np.ndarray:
        """Prompt [B, T] -> logits of its last position [B, V]; chunks of the profile's max."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] != self.session["batch"]:
            raise BundleError(f"prompt of shape {ids.shape}: expected [{self.session['batch']} "
                              "(the batch given to open), tokens >= 1]")
        for start in range(0, ids.shape[1], self.max_prefill):
            chunk = ids[:, start:start + self.max_prefill]          # [B, <= max_prefill]
            logits = self._prefill_chunk(chunk, pos + start)
        return logits

    def _prefill_chunk(self, ids: np.ndarray, pos: int) -> np.ndarray:
        cu, ds, s = self.cuda, self.state, self.streams[0]
        self._sync_all()
        batch, seq = ids.shape
        host_ids = self.host_prompt[: batch * seq].reshape(batch, seq)         # pinned [B, seq]
        host_pos = self.host_prompt[batch * seq: batch * (seq + 1)]            # pinned [B]
        host_ids[...], host_pos[...] = ids, pos
        d_ids, d_pos = ds.scratch("ids", host_ids.nbytes), ds.scratch("pos", host_pos.nbytes)
        cu.copy(d_ids, host_ids.ctypes.data, host_ids.nbytes, s)
        cu.copy(d_pos, host_pos.ctypes.data, host_pos.nbytes, s)
        produced, handoff = {}, []
        for k, io in enumerate(self.ios):
            addr = {"input_ids": d_ids, "pos": d_pos, **ds.rings[k],
                    **ds.prefill_buffers(k, seq, pos, produced, s)}
            shapes = {t["name"]: shape_of(t, batch, seq) for t in io["inputs"]}
            self._bind(self.prefill_ctx[k], k, shapes, addr, "prefill")
            self._execute(self.prefill_ctx[k], k, s, "prefill")
            handoff += ds.prefill_commit(k, addr, seq, pos, s)
            produced = addr
        for c in handoff:      # after every stack: pending[k][(pos+seq) % 2] may be [pos % 2]
            cu.copy2d(c, s)
        host = self.host_prefill[:batch]              # logits [B, seq, V] -> [B, V] at seq-1
        cu.copy2d(seq_slice_copy(host.ctypes.data, 1, 0, produced["logits"], seq, seq - 1, 1,
                                 batch, host.shape[1] * 4), s)
        cu.sync(s)
        self._settle()
        return host.copy()

    # ---- decode --------------------------------------------------------------------------------
    def set_step(self, tokens: np.ndarray, pos: int) -> None:
        """Write the step's tokens [B] and position into the next pinned slot (no device sync
        unless that slot's upload from P+1 steps ago is still in flight)."""
        st, cu = self.session, self.cuda
        slot = (st["slot"] + 1) % len(st["tokens"])
        for ev in self.uploaded[slot]:
            if not cu.query(ev):
                cu.event_sync(ev)
        st["tokens"][slot][:] = tokens
        st["pos_host"][slot].fill(pos)
        st["slot"], st["pos"] = slot, pos

    def launch(self, k: int, parity: int) -> None:
        """Enqueue stack k's decode step and its commits on its stream (see module docstring)."""
        cu, st, s = self.cuda, self.session, self.streams[k]
        slot = st["slot"]                  # the upload depends on no other stack: before waits
        cu.copy(st["step_dev"][k], self.host_steps[slot].ctypes.data, st["step_bytes"], s)
        cu.record(self.uploaded[slot][k], s)
        if not self.sequential:
            if k > 0:
                cu.wait(s, self.written[k - 1][1 - parity])
            if k < self.num_stacks - 1:
                cu.wait(s, self.consumed[k + 1][1 - parity])
        last = k == self.num_stacks - 1
        if self.graphs is not None:
            cu.launch_graph(self.graphs[k][parity], s)
            cu.record(self.written[k][parity], s)
        else:
            ctx = self.decode[k]
            for name, ptr in st["bind"][k][parity]:
                ctx.set_tensor_address(name, ptr)
            self._execute(ctx, k, s, "decode")
            cu.record(self.written[k][parity], s)
            self.state.commit(k, parity, st["pos"], s)
            if last:
                self._logits_copy(parity, s)
        cu.record(self.consumed[k][parity], s)
        if last:
            cu.record(self.logits_ready[parity], s)

    def finish(self) -> np.ndarray:
        """The step's logits [B, V]: the only host wait of a step. Valid until two steps later."""
        parity = self.session["pos"] % 2
        self.cuda.event_sync(self.logits_ready[parity])
        return self.session["logits"][parity]

    def close(self) -> None:
        """Free every device buffer, stream and event (the engines go with the object)."""
        if getattr(self, "cuda", None) is None:
            return
        self.session = self.state = None
        self.decode = self.prefill_ctx = []
        self.cuda.close()
        self.cuda = None
