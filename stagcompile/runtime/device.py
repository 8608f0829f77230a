"""CUDA helpers shared by the GPU backends (TensorRT, ONNX Runtime CUDA), on cuda-python's cudart.

    Cuda(device)            error-checked cudart calls; tracks what it allocates, `close()` frees it
      .malloc(n) .memset_async .pinned(shape, dtype) .stream() .event() .record .wait .query
      .copy(dst, src, n, stream)  .copy2d(Copy2D, stream)  .sync(stream) .event_sync(ev)
      .begin_capture(s) .end_capture(s) .instantiate(graph) .launch_graph(exe, s) .free_graph
      .drop_graph(graph)
      .load_module(ptx) .function(module, name) .launch(func, grid, block, s, args)  PTX kernels
    gpu_info()              (name, (major, minor)) of device 0: cuda-python, else libcuda (ctypes)
    device_count()          visible CUDA devices (0 without a GPU); ImportError without cuda-python
    native(handle)          a cuda-python handle as the int TensorRT / ONNX Runtime take
    Copy2D, ring_commit_copies, seq_slice_copy
                            the pure arithmetic of moving [rows, L, row] slices: a ring commit
                            ring [B, H, C, D] <- new [B, H, S, D] at slots p mod C is at most two
                            cudaMemcpy2DAsync (B*H rows of D elements, pitch C*D), so a commit
                            costs what the new entries weigh, never the ring
    commit_table(pairs)     the same commits (S = 1) as the table of the device commit kernel
                            (plugins/ring_commit.py), which computes the slot from pos on the GPU

Every call returns `(cudaError_t, *results)` (driver calls: `(CUresult, *results)`); `check` raises
DeviceError (a BundleError) naming the call, the error name and CUDA's message. Graph capture uses
cudaStreamCaptureModeThreadLocal (as trtexec); PTX kernels go through the driver API
(cuModuleLoadData, cuLaunchKernel) in the primary context cudaSetDevice makes current. Copies use
cudaMemcpyDefault (unified addressing, every 64-bit Linux CUDA platform), so one helper serves
H2D, D2H and D2D. Only numpy, ctypes and cuda-python (imported when a Cuda is made) are needed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .bundle import BundleError

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


def load_driver():
    """cuda-python's driver module: `cuda.bindings.driver` (>= 12.6.1), else `cuda.cuda`."""
    try:
        from cuda.bindings import driver
        return driver
    except ImportError:
        from cuda import cuda
        return cuda


def error_text(api, err) -> str:
    """Name and message of a runtime (cudaError_t) or driver (CUresult) error."""
    runtime = hasattr(api, "cudaGetErrorName")
    name = (api.cudaGetErrorName if runtime else api.cuGetErrorName)(err)[1]
    text = (api.cudaGetErrorString if runtime else api.cuGetErrorString)(err)[1]
    decode = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else str(b))
    return f"{decode(name)} ({decode(text)})"


def check(api, result, what: str):
    """Unwrap a cudart / driver result tuple: () -> None, (x,) -> x, else the tuple; raise on an
    error."""
    err, rest = result[0], result[1:]
    if int(err) != 0:
        raise DeviceError(f"CUDA {what} failed: {error_text(api, err)}")
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


def commit_table(pairs) -> np.ndarray:
    """int64 [N, 5] rows (ring, new, rows, capacity, row bytes): the table of the device commit
    kernel (plugins/ring_commit.py), one row per ring committed at slot pos mod capacity."""
    return np.array([list(p) for p in pairs], dtype=np.int64).reshape(-1, 5)


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
        self.driver = None
        self._buffers: list[int] = []
        self._pinned: list[int] = []
        self._streams: list = []
        self._events: list = []
        self._graphs: list = []
        self._modules: list = []

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

    # CUDA graphs
    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream):
        """The captured graph, or None when the capture was invalidated (error state cleared)."""
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if int(err) != 0 or graph is None:
            self.rt.cudaGetLastError()
            return None
        return graph

    def drop_graph(self, graph) -> None:
        """Destroy a captured graph that will not be instantiated."""
        self.check(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def instantiate(self, graph):
        try:
            exe = self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)
        self._graphs.append(exe)
        return exe

    def free_graph(self, exe) -> None:
        self._graphs.remove(exe)
        self.check(self.rt.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")

    def launch_graph(self, exe, stream) -> None:
        self.check(self.rt.cudaGraphLaunch(exe, stream), "cudaGraphLaunch")

    # PTX kernels (driver API)
    def load_module(self, ptx: str):
        self.driver = self.driver or load_driver()
        module = check(self.driver, self.driver.cuModuleLoadData(ptx.encode() + b"\0"),
                       "cuModuleLoadData (PTX newer than this driver supports?)")
        self._modules.append(module)
        return module

    def function(self, module, name: str):
        return check(self.driver, self.driver.cuModuleGetFunction(module, name.encode()),
                     f"cuModuleGetFunction({name})")

    def launch(self, func, grid: tuple, block: int, stream, args: tuple, shared: int = 0) -> None:
        """func<<<grid, block threads, `shared` bytes of dynamic shared memory, stream>>>(args):
        `args` are ints, each a pointer unless given as (value, ctypes type)."""
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        pairs = [a if isinstance(a, tuple) else (a, ctypes.c_void_p) for a in args]
        params = (tuple(v for v, _ in pairs), tuple(t for _, t in pairs))
        check(self.driver, self.driver.cuLaunchKernel(func, gx, gy, gz, block, 1, 1, shared,
                                                      stream, params, 0), "cuLaunchKernel")

    def close(self) -> None:
        """Wait for every stream, then free graphs, modules, buffers, pinned memory, events and
        streams."""
        rt = self.rt
        for s in self._streams:
            rt.cudaStreamSynchronize(s)
        for exe in self._graphs:
            rt.cudaGraphExecDestroy(exe)
        for module in self._modules:
            self.driver.cuModuleUnload(module)
        for p in self._buffers:
            rt.cudaFree(p)
        for p in self._pinned:
            rt.cudaFreeHost(p)
        for e in self._events:
            rt.cudaEventDestroy(e)
        for s in self._streams:
            rt.cudaStreamDestroy(s)
        self._buffers, self._pinned, self._events, self._streams = [], [], [], []
        self._graphs, self._modules = [], []
