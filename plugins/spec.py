"""Shape, dtype and launch-grid rules of BoundedWindowAttention as plain functions.

Every implementation (torch reference, Triton, TensorRT plugin, ONNX Runtime kernel) checks its
arguments here, so a bad call gets the same message from all of them. Nothing here imports torch,
numpy, triton or tensorrt: shapes are tuples of ints and dtypes are names ("float32", "float16",
"bfloat16", "int64", "int32").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
POS_DTYPES = ("int64", "int32")
INPUT_NAMES = ("q", "k_new", "v_new", "k_cache", "v_cache", "pos")


class AttentionSpecError(ValueError):
    """Inputs or attributes that BoundedWindowAttention does not accept."""


@dataclass(frozen=True)
class Dims:
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    capacity: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


def check_shapes(q: tuple, k_new: tuple, v_new: tuple, k_cache: tuple, v_cache: tuple,
                 pos: tuple) -> Dims:
    """Validate the six input shapes; return the named dimensions."""
    shapes = dict(zip(INPUT_NAMES, (q, k_new, v_new, k_cache, v_cache, pos)))
    for name, shape in shapes.items():
        rank = 1 if name == "pos" else 4
        if len(shape) != rank:
            raise AttentionSpecError(f"BoundedWindowAttention input {name}: expected rank {rank}, "
                                     f"got shape {tuple(shape)}")
    b, hq, s, d = q
    _, hkv, _, _ = k_new
    c = k_cache[2]
    expected = {"k_new": (b, hkv, s, d), "v_new": (b, hkv, s, d), "k_cache": (b, hkv, c, d),
                "v_cache": (b, hkv, c, d), "pos": (b,)}
    for name, want in expected.items():
        if tuple(shapes[name]) != want:
            raise AttentionSpecError(f"BoundedWindowAttention input {name}: expected shape {want} "
                                     f"(from q {tuple(q)} and k_new {tuple(k_new)}), got "
                                     f"{tuple(shapes[name])}")
    if hkv < 1 or hq % hkv:
        raise AttentionSpecError(f"BoundedWindowAttention: q has {hq} heads, k_new has {hkv}; "
                                 "the query heads must be a multiple of the key/value heads")
    return Dims(b, hq, hkv, s, c, d)


def check_dtypes(q: str, k_new: str, v_new: str, k_cache: str, v_cache: str, pos: str) -> None:
    """All float inputs share one dtype out of FLOAT_DTYPES; pos is int64 or int32."""
    if q not in FLOAT_DTYPES:
        raise AttentionSpecError(f"BoundedWindowAttention input q: dtype {q} not supported; "
                                 f"expected one of {', '.join(FLOAT_DTYPES)}")
    for name, dt in zip(INPUT_NAMES[1:5], (k_new, v_new, k_cache, v_cache)):
        if dt != q:
            raise AttentionSpecError(f"BoundedWindowAttention input {name}: dtype {dt} differs "
                                     f"from q's {q}; all float inputs must share one dtype")
    if pos not in POS_DTYPES:
        raise AttentionSpecError(f"BoundedWindowAttention input pos: dtype {pos} not supported; "
                                 f"expected one of {', '.join(POS_DTYPES)}")


def check_attrs(window: int, scale: float) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise AttentionSpecError(f"BoundedWindowAttention attribute window={window!r}: expected "
                                 "an integer >= 0 (0 = unbounded)")
    if not scale > 0:
        raise AttentionSpecError(f"BoundedWindowAttention attribute scale={scale!r}: "
                                 "expected a number > 0")


def check_capacity(capacity: int, window: int, max_pos: int | None = None) -> None:
    """The ring must hold every earlier entry a query can see (see the spec in `plugins`).

    Bounded: C >= window - 1; unbounded: C >= pos. With `max_pos` (the largest pos of the call)
    the requirement is relaxed to what that call can actually read (an empty cache at pos 0)."""
    need = window - 1 if window > 0 else max_pos
    if need is None:
        return
    if max_pos is not None:
        need = min(need, max_pos)
    if capacity < need:
        what = f"window - 1 = {window - 1}" if window > 0 else f"pos = {max_pos}"
        raise AttentionSpecError(f"BoundedWindowAttention: cache capacity C={capacity} is smaller "
                                 f"than the {need} earlier entries a query can read ({what})")


def required_capacity(window: int | None, max_seq_len: int) -> int:
    """Ring slots stagcompile allocates: the window when bounded, else max_seq_len."""
    return window if window else max_seq_len


# Launch geometry shared by the Triton JIT launcher (`plugins.triton_kernel`), the AOT compiler
# (`plugins.aot`) and the TensorRT plugin (`plugins.trt_plugin`).
#
# One program handles BLOCK_M query rows of one (batch row, key/value head). The rows of a
# key/value head are its G = Hq / Hkv query heads times the S new positions, ordered position-major:
# row r is query head kv_head * G + r % G at new index r // G. A block of rows therefore spans
# consecutive positions (tight causal and window bounds) and, in decode, all G heads that share
# the same keys, so each key/value tile is loaded once for the whole group.
BLOCK_M = 16        # query rows per program (tl.dot needs M >= 16)
NUM_WARPS = 4


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time tile sizes of the Triton kernel for one (dtype, head dim)."""
    block_m: int        # query rows per program
    block_n: int        # keys per inner-loop iteration
    block_d: int        # head dim padded to a power of two
    num_warps: int
    num_stages: int     # software pipelining depth of the key loop


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (Triton block shapes are powers of two)."""
    n = 16
    while n < head_dim:
        n *= 2
    return n


MAX_HEAD_DIM = 256


def check_head_dim(head_dim: int) -> None:
    if head_dim < 2 or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise AttentionSpecError(f"BoundedWindowAttention: head dim D={head_dim} not supported by "
                                 f"the Triton kernel; expected an even number in 2..{MAX_HEAD_DIM}")


def kernel_config(dtype: str, head_dim: int) -> KernelConfig:
    """Tiles chosen with ptxas -v (sm_87, sm_90, triton 3.9): no register spills, and at most
    ~43 KiB of shared memory (K/V pipeline buffers), under the 48 KiB a launch gets without
    opting in to more (TensorRT does not document that its AOT plugin launch opts in)."""
    if dtype not in FLOAT_DTYPES:
        raise AttentionSpecError(f"BoundedWindowAttention: dtype {dtype} not supported; expected "
                                 f"one of {', '.join(FLOAT_DTYPES)}")
    check_head_dim(head_dim)
    bd = block_d(head_dim)
    if dtype == "float32":
        block_n, stages = (32, 2) if bd <= 128 else (16, 1)
    else:
        block_n, stages = (64, 3) if bd <= 64 else (32, 3) if bd <= 128 else (32, 2)
    return KernelConfig(BLOCK_M, block_n, bd, NUM_WARPS, stages)


def row_align(head_dim: int, itemsize: int, *addresses: int) -> int:
    """Bytes (1..16, a power of two) that every key/value row address is a multiple of: the
    row size D * itemsize and the buffers' base addresses (TensorRT requires 256-byte aligned
    I/O addresses, NvInferRuntime.h setTensorAddress)."""
    return math.gcd(16, head_dim * itemsize, *addresses)


SCALAR_ARG_NAMES = ("batch", "q_heads", "kv_heads", "seq", "capacity")


def size_args(q_shape, k_new_shape, k_cache_shape) -> tuple:
    """The kernel's int32 arguments after the six input pointers, in order: B, Hq, Hkv, S, C.

    Shapes may be tuples of ints or TensorRT `ShapeExprs` (anything indexable)."""
    return (q_shape[0], q_shape[1], k_new_shape[1], q_shape[2], k_cache_shape[2])


def launch_grid_of(batch, q_heads, kv_heads, seq, block_m: int = BLOCK_M) -> tuple:
    """(row blocks, batch * kv heads, 1): one program per BLOCK_M rows of one kv head.

    Works on ints and on TensorRT shape expressions: it only uses `*`, `//` and `+ int` with
    the expression on the left, which `trtp.ShapeExpr` supports (it has no reflected ops)."""
    rows = q_heads // kv_heads * seq                                  # G * S rows per kv head
    return ((rows + (block_m - 1)) // block_m, batch * kv_heads, 1)


def launch_grid(dims: Dims, block_m: int = BLOCK_M) -> tuple[int, int, int]:
    """The grid for concrete dimensions."""
    return launch_grid_of(dims.batch, dims.q_heads, dims.kv_heads, dims.seq, block_m)
