"""BoundedWindowAttention as a Triton kernel (decode S = 1 and prefill S > 1), plus its launcher.

The operation is specified in `plugins` and defined by `plugins.reference`; this is the O(window)
GPU implementation. It runs natively on CUDA tensors, or on CPU tensors under the Triton
interpreter: Triton reads TRITON_INTERPRET=1 when it is imported (its own `tl` helpers become
interpreted functions), and `interpreter_mode()` reports which mode this process is in.
`plugins.aot` compiles the same kernel ahead of time to PTX for the TensorRT plugin; this module
imports torch only inside the launcher, so AOT compilation needs just triton.

Design (geometry in `plugins.spec`):

    grid = (ceil(G * S / BLOCK_M), B * Hkv)       G = Hq / Hkv query heads per kv head
    program (m, b * Hkv + kvh) owns rows r in [m * BLOCK_M, (m + 1) * BLOCK_M) of kv head kvh:
        row r = query head kvh * G + r % G at new index s = r // G, position p = pos[b] + s

    keys visited: positions lo .. hi of the row block, BLOCK_N at a time, where
        hi = pos[b] + s_last                       (causal: nothing after the last query)
        lo = max(0, pos[b] + s_first - window + 1)  (0 when window = 0)
    key position p' >= pos[b]  -> k_new / v_new row p' - pos[b]
    key position p' <  pos[b]  -> k_cache / v_cache ring slot p' mod C

Only positions in [lo, hi] are ever loaded (masked loads; nothing else is dereferenced), so a NaN
in a ring slot outside every query's window cannot reach the output, not even as 0 * NaN in p @ v.
Per row, keys outside (p - window, p] are masked to -inf before an online (flash-attention)
softmax in fp32; p @ v runs in the input dtype with fp32 accumulation, as the reference does.
Head dims are padded to a power of two BLOCK_D with masked loads and stores. Key/value rows are
picked per key from one of two buffers (tl.where on pointers), which hides their alignment from
Triton; ROW_ALIGN (bytes, `plugins.spec.row_align`) restores it so the loads become 16-byte
cp.async copies. DOT_IN_FP32 widens the dot operands to fp32 (exact bf16 products, fp32 sums:
what tensor cores compute); the launcher sets it only under the interpreter, which cannot do
bf16 arithmetic (triton-lang/triton#11584).

Kernel argument order is the TensorRT AOT plugin's: input pointers (q, k_new, v_new, k_cache,
v_cache, pos), int32 scalars (B, Hq, Hkv, S, C), the output pointer, then constexprs. Inputs are
contiguous; strides are computed from the dims. Base offsets are int64; positions and offsets
inside one (batch row, kv head) block are int32.
"""

import functools

import triton
import triton.language as tl

from plugins import spec

LOG2E = tl.constexpr(1.4426950408889634)


def bounded_window_attention_kernel(q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr,
                                    batch, q_heads, kv_heads, seq, capacity,
                                    out_ptr,
                                    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
                                    SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                    ROW_ALIGN: tl.constexpr, DOT_IN_FP32: tl.constexpr = False):
    """The Triton kernel body (undecorated: `jit_kernel()` and the interpreter wrap it)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)                       # b * Hkv + kv head
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads
    group = q_heads // kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row = s * G + g
    row_ok = rows < group * seq
    s = tl.minimum(rows // group, seq - 1)          # padding rows reuse the last position
    head = kvh * group + rows % group               # [BLOCK_M] query head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    p0 = tl.load(pos_ptr + b).to(tl.int32)          # position of new entry 0
    qpos = p0 + s                                   # [BLOCK_M]
    s_first = (pid_m * BLOCK_M) // group
    s_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, seq - 1)
    hi = p0 + s_last
    if WINDOW > 0:
        lo = tl.maximum(p0 + s_first - WINDOW + 1, 0)
    else:
        lo = 0

    q_rows = ((b * q_heads + head).to(tl.int64) * seq + s) * HEAD_DIM      # [BLOCK_M]
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    kv = pid_bh.to(tl.int64)
    k_new_ptr += kv * seq * HEAD_DIM                # this (b, kv head)'s [S, D] and [C, D] blocks
    v_new_ptr += kv * seq * HEAD_DIM
    k_cache_ptr += kv * capacity * HEAD_DIM
    v_cache_ptr += kv * capacity * HEAD_DIM
    ring = tl.maximum(capacity, 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi + 1, BLOCK_N):
        kp = start + tl.arange(0, BLOCK_N)                                  # [BLOCK_N] positions
        in_new = kp >= p0
        load_mask = (kp <= hi)[:, None] & d_ok[None, :]                     # kp >= lo >= 0 here
        new_row = (kp - p0) * HEAD_DIM
        cache_row = (kp % ring) * HEAD_DIM
        k_rows = tl.where(in_new, k_new_ptr + new_row, k_cache_ptr + cache_row)  # [BLOCK_N] ptrs
        k_rows = tl.multiple_of(k_rows, ROW_ALIGN)
        k = tl.load(k_rows[:, None] + d[None, :], mask=load_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_IN_FP32:
            k = k.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * (SCALE * LOG2E)
        visible = kp[None, :] <= qpos[:, None]                              # [BLOCK_M, BLOCK_N]
        if WINDOW > 0:
            visible = visible & (kp[None, :] > qpos[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)              # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v_rows = tl.multiple_of(tl.where(in_new, v_new_ptr + new_row, v_cache_ptr + cache_row),
                                ROW_ALIGN)
        v = tl.load(v_rows[:, None] + d[None, :], mask=load_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        p = p.to(v.dtype)                                                   # as the reference does
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


@functools.lru_cache(maxsize=None)
def jit_kernel():
    """The kernel as a Triton JITFunction (native GPU launches and AOT compilation), whatever
    TRITON_INTERPRET says (`triton.jit` would return an interpreted function under it)."""
    return triton.runtime.JITFunction(bounded_window_attention_kernel)


@functools.lru_cache(maxsize=None)
def _interpreted_kernel():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(bounded_window_attention_kernel)


def interpreter_mode() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (set before the import)."""
    return not isinstance(tl.standard.max, triton.runtime.JITFunction)


def bounded_window_attention_triton(q, k_new, v_new, k_cache, v_cache, pos, window: int = 0,
                                    scale: float | None = None, out=None):
    """See `plugins` for the specification. Returns [B, Hq, S, D] in q's dtype (written to `out`
    when given). CUDA tensors run natively; CPU tensors need the interpreter (see module doc)."""
    import torch

    from plugins.reference import check_inputs

    if scale is None:
        scale = q.shape[-1] ** -0.5
    dims = check_inputs(q, k_new, v_new, k_cache, v_cache, pos, window, scale)
    tensors = [t.contiguous() for t in (q, k_new, v_new, k_cache, v_cache, pos)]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise spec.AttentionSpecError(f"BoundedWindowAttention: inputs on several devices "
                                      f"{sorted(map(str, devices))}; expected one")
    device = devices.pop()
    interpret = interpreter_mode()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(f"bounded_window_attention_triton: inputs are on {device}; the Triton "
                           "kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                           "imported to run on CPU")
    if device.type == "cpu" and pos.numel():
        spec.check_capacity(dims.capacity, window, int(pos.max()))
    if out is None:
        out = tensors[0].new_empty(tuple(q.shape))
    elif (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != device
          or not out.is_contiguous()):
        raise spec.AttentionSpecError(f"BoundedWindowAttention: out must be a contiguous "
                                      f"{q.dtype} tensor of shape {tuple(q.shape)} on {device}, "
                                      f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if q.numel() == 0:
        return out
    cfg = spec.kernel_config(str(q.dtype).removeprefix("torch."), dims.head_dim)
    kernel = _interpreted_kernel() if interpret else jit_kernel()
    if interpret:   # the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584)
        launch = {"DOT_IN_FP32": q.dtype == torch.bfloat16}
    else:
        launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                  "enable_fp_fusion": True}      # as plugins.aot compiles it
    kernel[spec.launch_grid(dims, cfg.block_m)](
        *tensors, *spec.size_args(q.shape, k_new.shape, k_cache.shape), out,
        HEAD_DIM=dims.head_dim, WINDOW=window, SCALE=float(scale),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        ROW_ALIGN=spec.row_align(dims.head_dim, q.element_size(),
                                 *(t.data_ptr() for t in tensors[1:5])), **launch)
    return out
