"""CUDA helpers shared by the GPU backends (TensorRT, ONNX Runtime CUDA), on cuda-python's cudart.

    Cuda(device)            error-checked cudart calls; tracks what it allocates, `close()` frees it
      .malloc(n) .memset_async .pinned(shape, dtype) .stream() .event() .record .wait .query
      .copy(dst, src, n, stream)  .copy2d(Copy2D, stream)  .sync(stream) .event_sync(ev)
    gpu_info()              (name, (major, minor)) of device 0: cuda-python, else libcuda (ctypes)
    device_count()          visible CUDA devices (0 without a GPU); ImportError without cuda-python
    native(handle)          a cuda-python handle as the int TensorRT / ONNX Runtime take
    Copy2D, ring_commit_copies, seq_slice_copy
                            the pure arithmetic of moving [rows, L, row] slices: a ring commit
                            ring [B, H, C, D] <- new [B, H, S, D] at slots p mod C is at most two
                            cudaMemcpy2DAsync (B*H rows of D elements, pitch C*D), so a commit
                            costs what the new entries weigh, never the ring
    DeviceState(cuda, ios, batch)
                            HostState on the device: rings, staging, two-parity pending buffers,
                            their commits, and the prefill's cross_in assembly and hand-off

Every call returns `(cudaError_t, *results)`; `check` raises DeviceError (a BundleError) naming the
call, the error name and CUDA's message. Copies use cudaMemcpyDefault (unified addressing, every
64-bit Linux CUDA platform), so one helper serves H2D, D2H and D2D. Only numpy, ctypes and
cuda-python (imported when a Cuda is made) are needed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .bundle import BundleError
from .rings import role_map, shape_of

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
ALIGN = 256     # TensorRT requires >= 256-byte aligned tensor addresses (NvInferRuntime.h)
INSTALL = ("pip install 'cuda-python>=12.6,<13' (CUDA 12 drivers, JetPack 6); cuda-python 13 "
           "needs an R580+ driver")


class DeviceError(BundleError):
    """No usable GPU, cuda-python missing, or a CUDA call failed."""


def load_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (>= 12.6.1), else `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        raise DeviceError(f"the GPU backends need cuda-python, which is not installed: {INSTALL}") \
            from None


def error_text(rt, err) -> str:
    name = rt.cudaGetErrorName(err)[1]
    text = rt.cudaGetErrorString(err)[1]
    decode = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else str(b))
    return f"{decode(name)} ({decode(text)})"


def check(rt, result, what: str):
    """Unwrap a cudart result tuple: () -> None, (x,) -> x, else the tuple; raise on an error."""
    err, rest = result[0], result[1:]
    if int(err) != 0:
        raise DeviceError(f"CUDA {what} failed: {error_text(rt, err)}")
    return None if not rest else rest[0] if len(rest) == 1 else rest


def native(handle) -> int:
    """The integer value of a stream / event / pointer handle (TensorRT, ORT take ints)."""
    if isinstance(handle, int):
        return handle
    try:
        from cuda.bindings.utils import get_cuda_native_handle
        return int(get_cuda_native_handle(handle))
    except ImportError:
        return int(handle)


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]


# ---- pure copy arithmetic (tested on CPU) ------------------------------------------------------
@dataclass(frozen=True)
class Copy2D:
    """cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height): `height` rows, `width` bytes."""
    dst: int
    dpitch: int
    src: int
    spitch: int
    width: int
    height: int


def seq_slice_copy(dst: int, dst_len: int, dst_start: int, src: int, src_len: int,
                   src_start: int, count: int, rows: int, row_bytes: int) -> Copy2D:
    """dst[:, dst_start : dst_start+count] <- src[:, src_start : src_start+count] for tensors
    viewed as [rows, len, row]: rows = B*H and row = D elements for KV, rows = B for logits."""
    if not (0 <= dst_start and dst_start + count <= dst_len and 0 <= src_start
            and src_start + count <= src_len and count > 0):
        raise ValueError(f"slice copy out of range: dst [{dst_start}, +{count}) of {dst_len}, "
                         f"src [{src_start}, +{count}) of {src_len}")
    return Copy2D(dst + dst_start * row_bytes, dst_len * row_bytes,
                  src + src_start * row_bytes, src_len * row_bytes, count * row_bytes, rows)


def ring_commit_copies(ring: int, new: int, rows: int, capacity: int, seq: int, pos: int,
                       row_bytes: int) -> list[Copy2D]:
    """ring [rows, C, row] <- new [rows, S, row] for positions pos .. pos+S-1 at slots p mod C.
    Only the last min(C, S) entries survive; a run that wraps past slot C-1 splits in two."""
    keep = min(capacity, seq)
    first = pos + seq - keep
    out, done = [], 0
    while done < keep:
        slot = (first + done) % capacity
        run = min(keep - done, capacity - slot)
        out.append(seq_slice_copy(ring, capacity, slot, new, seq, seq - keep + done, run, rows,
                                  row_bytes))
        done += run
    return out


# ---- GPU info ------------------------------------------------------------------------------------
def _gpu_info_driver(device: int) -> tuple[str, tuple[int, int]]:
    """Name and compute capability from libcuda (the driver) when cuda-python is absent."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise DeviceError(f"no NVIDIA driver: libcuda.so.1 cannot be loaded ({exc})") from None
    if lib.cuInit(0) != 0:
        raise DeviceError("the NVIDIA driver is installed but cuInit failed (no usable GPU?)")
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        raise DeviceError(f"no CUDA device {device} ({count.value} visible)")
    dev, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(dev), device)
    lib.cuDeviceGetName(name, 256, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)   # ..._COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)   # ..._COMPUTE_CAPABILITY_MINOR
    return name.value.decode(errors="replace"), (major.value, minor.value)


def device_count() -> int:
    """Visible CUDA devices (0 without a driver or GPU); ImportError without cuda-python."""
    try:
        rt = load_cudart()
    except DeviceError as exc:
        raise ImportError(str(exc)) from None
    err, count = rt.cudaGetDeviceCount()
    return int(count) if int(err) == 0 else 0


def gpu_info(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of a CUDA device; DeviceError saying why when there is none."""
    try:
        rt = load_cudart()
    except DeviceError:
        return _gpu_info_driver(device)
    count = check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount (is an NVIDIA GPU and driver "
                                                "present?)")
    if count <= device:
        raise DeviceError(f"no CUDA device {device} ({count} visible)")
    prop = check(rt, rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.split(b"\0", 1)[0].decode(errors="replace") \
        if isinstance(prop.name, bytes) else str(prop.name)
    return name, (int(prop.major), int(prop.minor))


# ---- the allocator / stream owner ------------------------------------------------------------
class Cuda:
    """One device's cudart with error checking; everything it creates is released by close()."""

    def __init__(self, device: int = 0):
        self.rt = rt = load_cudart()
        self.device = device
        count = self.check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount (is an NVIDIA GPU and "
                                                    "driver present?)")
        if count <= device:
            raise DeviceError(f"no CUDA device {device} ({count} visible)")
        self.check(rt.cudaSetDevice(device), "cudaSetDevice")
        self.default = rt.cudaMemcpyKind.cudaMemcpyDefault
        self._buffers: list[int] = []
        self._pinned: list[int] = []
        self._streams: list = []
        self._events: list = []

    def check(self, result, what: str):
        return check(self.rt, result, what)

    def info(self) -> tuple[str, tuple[int, int]]:
        return gpu_info(self.device)

    # allocation
    def malloc(self, size: int) -> int:
        ptr = self.check(self.rt.cudaMalloc(max(1, size)), f"cudaMalloc({size} bytes)")
        self._buffers.append(int(ptr))
        return int(ptr)

    def free(self, ptr: int) -> None:
        self._buffers.remove(ptr)
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def pinned(self, shape, dtype) -> np.ndarray:
        """A page-locked host array (async copies from/to it overlap with compute)."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = int(self.check(self.rt.cudaHostAlloc(max(1, size), self.rt.cudaHostAllocDefault),
                             f"cudaHostAlloc({size} bytes)"))
        self._pinned.append(ptr)
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)),
                                    (max(1, size),))
        return raw[:size].view(dtype).reshape(shape)          # bytes [size] -> dtype [*shape]

    def stream(self):
        s = self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking),
                       "cudaStreamCreateWithFlags")
        self._streams.append(s)
        return s

    def event(self):
        e = self.check(self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming),
                       "cudaEventCreateWithFlags")
        self._events.append(e)
        return e

    # ordering
    def record(self, event, stream) -> None:
        self.check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def wait(self, stream, event) -> None:
        self.check(self.rt.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")

    def query(self, event) -> bool:
        """True when the event's work is done, False while it is pending."""
        err = self.rt.cudaEventQuery(event)[0]
        if err == self.rt.cudaError_t.cudaErrorNotReady:
            return False
        self.check((err,), "cudaEventQuery")
        return True

    def event_sync(self, event) -> None:
        self.check(self.rt.cudaEventSynchronize(event), "cudaEventSynchronize")

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    # copies
    def copy(self, dst: int, src: int, size: int, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, src, size, self.default, stream),
                   "cudaMemcpyAsync")

    def copy2d(self, c: Copy2D, stream) -> None:
        self.check(self.rt.cudaMemcpy2DAsync(c.dst, c.dpitch, c.src, c.spitch, c.width, c.height,
                                             self.default, stream), "cudaMemcpy2DAsync")

    def memset_async(self, ptr: int, size: int, stream) -> None:
        self.check(self.rt.cudaMemsetAsync(ptr, 0, size, stream), "cudaMemsetAsync")

    def close(self) -> None:
        """Wait for every stream, then free buffers, pinned memory, events and streams."""
        rt = self.rt
        for s in self._streams:
            rt.cudaStreamSynchronize(s)
        for p in self._buffers:
            rt.cudaFree(p)
        for p in self._pinned:
            rt.cudaFreeHost(p)
        for e in self._events:
            rt.cudaEventDestroy(e)
        for s in self._streams:
            rt.cudaStreamDestroy(s)
        self._buffers, self._pinned, self._events, self._streams = [], [], [], []


# ---- the decode state of one session, on the device ---------------------------------------------
def cross_edges(ios: list[dict]) -> list[list[tuple[str, str, str]]]:
    """Per producer k: (cross_out name, cross_null name, consumer's cross_in name) by layer, k/v."""
    edges = []
    for k in range(len(ios) - 1):
        by: dict = {}
        for t in ios[k]["outputs"] + ios[k + 1]["inputs"]:
            by.setdefault((t["layer"], t["kv"]), {})[t["role"]] = t["name"]
        edges.append([(v["cross_out"], v["cross_null"], v["cross_in"])
                      for v in by.values() if "cross_out" in v])
    return edges


class DeviceState:
    """Device buffers of one (batch) session, laid out and used exactly like HostState:

        rings[k]       self.* / cross.* [B, H, C, D] (zeroed by reset)
        staging[k]     new_self.* [B, H, 1, D], cross_null.* scratch, logits [B, 1, V]
        pending[k][p]  cross_in.* [B, H, 1, D] of consumer k for steps of parity p

    At step i (parity p) stack k reads pending[k][p] and writes cross_out.* into
    pending[k+1][1-p]; `commit(k, p, pos, stream)` then copies its new_self.* and pending[k][p]
    into its rings at slot pos % C. Prefill chunks use grow-only scratch buffers."""

    def __init__(self, cuda: "Cuda", ios: list[dict], batch: int):
        self.cuda, self.ios, self.batch = cuda, ios, batch
        self.edges = cross_edges(ios)
        self.owned: list[int] = []
        self.zero: list[tuple[int, int]] = []
        self.scratch_bufs: dict = {}
        # KV tensors [B, H, L, D] viewed as [rows = B*H, L, row = D elements]: (rows, row bytes)
        self.geom = [{t["name"]: (batch * t["shape"][1], t["shape"][3] * ITEMSIZE[t["dtype"]])
                      for t in io["inputs"] + io["outputs"] if len(t["shape"]) == 4}
                     for io in ios]
        self.caps = [{t["name"]: t["shape"][2] for t in io["inputs"]
                      if t["role"] in ("self", "cross")} for io in ios]
        self.rings = [{t["name"]: self._alloc(shape_of(t, batch, 0), t["dtype"], True)
                       for t in io["inputs"] if t["role"] in ("self", "cross")} for io in ios]
        self.staging = [{t["name"]: self._alloc(shape_of(t, batch, 1), t["dtype"])
                         for t in io["outputs"] if t["role"] != "cross_out"} for io in ios]
        self.pending = [[{t["name"]: self._alloc(shape_of(t, batch, 1), t["dtype"], True)
                          for t in io["inputs"] if t["role"] == "cross_in"} for _ in range(2)]
                        for io in ios]
        self.commits = [[self.ring_pairs(k, self.staging[k], self.pending[k][p]) for p in (0, 1)]
                        for k in range(len(ios))]

    def _alloc(self, shape, dtype: str, zero: bool = False) -> int:
        size = nbytes(shape, dtype)
        ptr = self.cuda.malloc(size)
        self.owned.append(ptr)
        if zero:
            self.zero.append((ptr, size))
        return ptr

    def reset(self, stream) -> None:
        for ptr, size in self.zero:
            self.cuda.memset_async(ptr, size, stream)

    def inputs(self, k: int, parity: int) -> dict[str, int]:
        """Decode inputs of stack k but input_ids / pos (the backend's): rings, pending[k][p]."""
        return {**self.rings[k], **self.pending[k][parity]}

    def outputs(self, k: int, parity: int) -> dict[str, int]:
        out = dict(self.staging[k])
        if k < len(self.edges):
            nxt = self.pending[k + 1][1 - parity]
            out.update({src: nxt[dst] for src, _, dst in self.edges[k]})
        return out

    def ring_pairs(self, k: int, outputs: dict, inputs: dict) -> list[tuple]:
        """(ring, source, rows, capacity, row_bytes) of every ring stack k commits: new_self.*
        from `outputs` into self rings, cross_in.* from `inputs` into cross rings."""
        io, geom = self.ios[k], self.geom[k]
        pairs = [(outputs[src], dst) for src, dst in role_map(io, "new_self", "self")]
        pairs += [(inputs[src], dst) for src, dst in role_map(io, "cross_in", "cross", "inputs")]
        return [(self.rings[k][dst], src, geom[dst][0], self.caps[k][dst], geom[dst][1])
                for src, dst in pairs]

    def commit(self, k: int, parity: int, pos: int, stream) -> None:
        for ring, src, rows, cap, row in self.commits[k][parity]:
            for c in ring_commit_copies(ring, src, rows, cap, 1, pos, row):
                self.cuda.copy2d(c, stream)

    # prefill
    def scratch(self, key, size: int) -> int:
        ptr, have = self.scratch_bufs.get(key, (0, 0))
        if have < size:
            if ptr:
                self.cuda.free(ptr)
                self.owned.remove(ptr)
            ptr, have = self.cuda.malloc(size), size
            self.owned.append(ptr)
            self.scratch_bufs[key] = (ptr, have)
        return ptr

    def prefill_buffers(self, k: int, seq: int, pos: int, produced: dict, stream) -> dict:
        """Scratch for stack k's outputs, and cross_in = M[pos .. pos+seq-1] assembled from the
        pending entry (the producer's null entry at pos 0) and the producer's first seq-1."""
        io, out = self.ios[k], {}
        for t in io["outputs"]:
            out[t["name"]] = self.scratch((k, t["name"]),
                                          nbytes(shape_of(t, self.batch, seq), t["dtype"]))
        for src, null, dst in (self.edges[k - 1] if k > 0 else []):
            rows, row = self.geom[k][dst]
            buf = out[dst] = self.scratch((k, dst), rows * seq * row)
            head = produced[null] if pos == 0 else self.pending[k][pos % 2][dst]
            self.cuda.copy2d(seq_slice_copy(buf, seq, 0, head, 1, 0, 1, rows, row), stream)
            if seq > 1:
                self.cuda.copy2d(seq_slice_copy(buf, seq, 1, produced[src], seq, 0, seq - 1,
                                                rows, row), stream)
        return out

    def prefill_commit(self, k: int, addr: dict, seq: int, pos: int, stream) -> list[Copy2D]:
        """Commit stack k's chunk into its rings; returns the hand-off copies of its last cross
        entries to pending[k+1][(pos+seq) % 2], to run once every stack has read pending."""
        for ring, src, rows, cap, row in self.ring_pairs(k, addr, addr):
            for c in ring_commit_copies(ring, src, rows, cap, seq, pos, row):
                self.cuda.copy2d(c, stream)
        if k >= len(self.edges):
            return []
        nxt = self.pending[k + 1][(pos + seq) % 2]
        return [seq_slice_copy(nxt[dst], 1, 0, addr[src], seq, seq - 1, 1, *self.geom[k][src])
                for src, _, dst in self.edges[k]]

    def free(self) -> None:
        for ptr in self.owned:
            self.cuda.free(ptr)
        self.owned, self.scratch_bufs = [], {}
