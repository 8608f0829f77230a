"""Ring commits on the GPU with the slot computed on the device: what lets a decode step be one
CUDA graph replayed at every position.

After decode step i a stack copies each new entry into its ring at slot i mod C (DESIGN.md section
4, `stagcompile.runtime.rings.commit` with S = 1). Issued from the host, those copies carry
addresses that depend on i, so a captured graph would replay one position forever. This kernel
reads the position from the device buffer the step's graphs read (`pos`, int64 [B], all rows
equal in a decode step) and commits every ring of one stack in one launch:

    table  int64 [N, 5], one row per ring: (ring ptr, new ptr, rows, capacity C, row bytes)
           ring [rows, C, row bytes] <- new [rows, 1, row bytes] at slot pos[0] mod C
           (KV tensors [B, H, L, D] viewed as rows = B*H, row = D elements; the runtime's
           `DeviceState.commit_table` writes it once per session)
    grid   (N, max rows); program (e, r) copies row r of entry e, BLOCK bytes at a time

Bytes are copied as bytes, so one PTX serves every dtype and head size. `compile_ptx(cc)` builds it
ahead of time like the attention kernel (`plugins.aot`, no GPU needed); `stagcompile build` ships
it in the bundle and the TensorRT runtime loads it with cuda-python (no Triton at run time). On a
CPU the kernel runs under the Triton interpreter (tests).
"""

import dataclasses
import functools

import triton
import triton.language as tl

from plugins import aot

TABLE_COLUMNS = 5               # ring, new, rows, capacity, row bytes
NUM_PARAMS = 2                  # table_ptr, pos_ptr
NUM_WARPS = 1
BLOCK = 256                     # bytes per program per iteration
BASE_CC = 80                    # sm_80 PTX: the driver JIT-compiles it for every GPU >= 8.0


def ring_commit_kernel(table_ptr, pos_ptr, BLOCK: tl.constexpr):
    """The kernel body (undecorated: `jit_kernel()` and the interpreter wrap it)."""
    row = table_ptr + tl.program_id(0) * 5
    r = tl.program_id(1)
    rows = tl.load(row + 2)
    if r < rows:
        capacity = tl.load(row + 3)
        width = tl.load(row + 4)
        slot = tl.load(pos_ptr) % capacity
        dst = (tl.load(row) + (r * capacity + slot) * width).to(tl.pointer_type(tl.uint8))
        src = (tl.load(row + 1) + r * width).to(tl.pointer_type(tl.uint8))
        for start in range(0, width, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < width
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@functools.lru_cache(maxsize=None)
def jit_kernel():
    """The kernel as a Triton JITFunction whatever TRITON_INTERPRET says."""
    return triton.runtime.JITFunction(ring_commit_kernel)


@functools.lru_cache(maxsize=None)
def interpreted_kernel():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(ring_commit_kernel)


@dataclasses.dataclass(frozen=True)
class CommitKernel:
    name: str                   # PTX entry name
    ptx: str
    cc: int
    num_warps: int              # block = num_warps * 32 threads
    hidden_params: int          # unused Triton scratch params dropped from the PTX


@functools.lru_cache(maxsize=None)
def compile_ptx(cc: int = BASE_CC, ptx_version: int | None = None) -> CommitKernel:
    """The kernel as PTX for sm_<cc> declaring exactly (table_ptr, pos_ptr)."""
    args = (cc, aot.checked_ptx_version(cc, ptx_version))
    return aot.native_compile("plugins.ring_commit", "_compile_here", args,
                              lambda fields: CommitKernel(**fields))


def _compile_here(cc: int, ptx_version: int | None) -> CommitKernel:
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    md, ptx, hidden = aot.compile_triton(jit_kernel(), {"table_ptr": "*i64", "pos_ptr": "*i64"},
                                         {"BLOCK": BLOCK}, attrs, cc, NUM_WARPS, 1, ptx_version,
                                         NUM_PARAMS)
    return CommitKernel(md.name, ptx, cc, md.num_warps, hidden)
