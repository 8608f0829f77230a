"""Ahead-of-time compilation of the BoundedWindowAttention Triton kernel to PTX, without a GPU.

    compile_ptx(dtype, head_dim, window, scale, cc) -> AotKernel   (cached per argument tuple)
    write_ptx_bundle(folder, ...)                                   PTX for sm_87 and sm_90 + index

The TensorRT plugin (`plugins.trt_plugin`, `aot_impl`) ships the PTX inside the engine, and the
export stage may ship it in a bundle. Triton only needs its bundled LLVM and ptxas for this, so it
runs on a CPU machine (`triton.compile` with an explicit `GPUTarget`).

The kernel ABI TensorRT launches is: 6 input pointers, 5 int32 scalars (B, Hq, Hkv, S, C; see
`plugins.spec.size_args`), 1 output pointer. Triton >= 3.3 appends hidden pointer parameters
(`global_scratch`, and since 3.5 `profile_scratch`) that TensorRT does not know about. They are
only safe when the kernel needs no scratch, which `compile_ptx` asserts; it also checks that the
PTX never reads them and drops them from the `.entry` declaration, so the PTX declares exactly
the 12 parameters TensorRT passes (`AotKernel.hidden_params` records what was dropped).

PTX version. By default Triton stamps the newest PTX ISA its bundled ptxas knows (9.x for sm_90
with triton 3.9), which a deployed driver older than that CUDA release cannot JIT
(CUDA_ERROR_UNSUPPORTED_PTX_VERSION). `compile_ptx` pins the oldest ISA that supports the
target instead (`default_ptx_version`); pass `ptx_version` to override.
"""

import dataclasses
import functools
import json
import re
from pathlib import Path

from plugins import spec

INPUT_ARGS = ("q_ptr", "k_new_ptr", "v_new_ptr", "k_cache_ptr", "v_cache_ptr", "pos_ptr")
SCALAR_ARGS = ("batch", "q_heads", "kv_heads", "seq", "capacity")
OUTPUT_ARGS = ("out_ptr",)
NUM_PARAMS = len(INPUT_ARGS) + len(SCALAR_ARGS) + len(OUTPUT_ARGS)
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TRITON_POS_DTYPES = {"int64": "*i64", "int32": "*i32"}
BUNDLE_TARGETS = (87, 90)                   # Jetson Orin, Hopper (H100/H200)
MAX_STATIC_SHARED = 48 * 1024               # more needs cudaFuncSetAttribute, which TRT does not do

# Oldest PTX ISA that knows each target (PTX ISA release notes); 7.8 (CUDA 11.8) is the floor,
# the oldest CUDA that TensorRT 10 supports.
_MIN_PTX_FOR_TARGET = {87: 74, 89: 78, 90: 80, 100: 86, 101: 86, 120: 87}
_PTX_FLOOR = 78


class AotError(RuntimeError):
    """The kernel cannot be compiled into a form the TensorRT AOT plugin can launch."""


@dataclasses.dataclass(frozen=True)
class AotKernel:
    name: str                   # PTX entry name (the aot_impl kernel_name)
    ptx: str
    cc: int                     # compute capability, e.g. 90
    num_warps: int              # block = num_warps * 32 threads
    shared_mem: int             # bytes of shared memory per block
    config: spec.KernelConfig   # block sizes baked in
    hidden_params: int          # unused Triton scratch params dropped from the PTX


def default_ptx_version(cc: int) -> int:
    """PTX ISA version (e.g. 80 = 8.0) pinned for target sm_<cc>."""
    known = [c for c in _MIN_PTX_FOR_TARGET if c <= cc]
    return max(_PTX_FLOOR, _MIN_PTX_FOR_TARGET[max(known)] if known else _PTX_FLOOR)


def kernel_signature(dtype: str, head_dim: int, pos_dtype: str = "int64"
                     ) -> tuple[dict, dict, dict]:
    """(signature, constexprs-without-window/scale, attrs) for `triton.compiler.ASTSource`."""
    t = TRITON_DTYPES[dtype]
    cfg = spec.kernel_config(dtype, head_dim)
    signature = {name: f"*{t}" for name in INPUT_ARGS[:5]}
    signature["pos_ptr"] = TRITON_POS_DTYPES[pos_dtype]
    signature.update({name: "i32" for name in SCALAR_ARGS})
    signature["out_ptr"] = f"*{t}"
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_D": cfg.block_d, "DOT_IN_FP32": False,
                  "ROW_ALIGN": spec.row_align(head_dim, ITEMSIZE[dtype])}
    pointer_indices = [i for i, ty in enumerate(signature.values()) if ty.startswith("*")]
    # TensorRT hands plugins 256-byte aligned buffers; 16-byte alignment enables vector loads.
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_indices}
    return signature, constexprs, attrs


def _drop_hidden_params(ptx: str, name: str) -> tuple[str, int]:
    """Remove the trailing `.param` lines after the 12 real ones, after checking none is read."""
    params = re.findall(rf"^\s*\.param [^\n]*\b({name}_param_(\d+))\s*,?\s*$", ptx, flags=re.M)
    hidden = [p for p, i in params if int(i) >= NUM_PARAMS]
    if len(params) - len(hidden) != NUM_PARAMS:
        raise AotError(f"PTX entry {name} declares {len(params)} parameters; expected "
                       f"{NUM_PARAMS} (+ hidden Triton scratch pointers)")
    for p in hidden:
        if re.search(rf"\[{p}\]", ptx):
            raise AotError(f"PTX entry {name} reads hidden parameter {p}; TensorRT cannot pass it")
    if not hidden:
        return ptx, 0
    ptx = re.sub(rf"^\s*\.param [^\n]*\b({'|'.join(hidden)})\s*,?\s*\n", "", ptx, flags=re.M)
    last = f"{name}_param_{NUM_PARAMS - 1}"
    ptx = re.sub(rf"(\b{last}),(\s*\n\s*\))", r"\1\2", ptx)
    return ptx, len(hidden)


@functools.lru_cache(maxsize=None)
def compile_ptx(dtype: str, head_dim: int, window: int, scale: float, cc: int,
                pos_dtype: str = "int64", ptx_version: int | None = None) -> AotKernel:
    """Compile the kernel for sm_<cc> with window and scale baked in as constants."""
    import triton
    from triton.backends.compiler import GPUTarget

    from plugins.triton_kernel import jit_kernel

    spec.check_dtypes(dtype, dtype, dtype, dtype, dtype, pos_dtype)
    spec.check_attrs(window, scale)
    signature, constexprs, attrs = kernel_signature(dtype, head_dim, pos_dtype)
    constexprs.update(WINDOW=window, SCALE=float(scale))
    signature.update({name: "constexpr" for name in constexprs})
    cfg = spec.kernel_config(dtype, head_dim)
    src = triton.compiler.ASTSource(fn=jit_kernel(), signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
               "enable_fp_fusion": True, "ptx_version": ptx_version or default_ptx_version(cc)}
    with triton.knobs.runtime.scope():     # compiling reads TRITON_INTERPRET; it must be off
        triton.knobs.runtime.interpret = False
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    md = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, field, 0):
            raise AotError(f"Triton kernel {md.name} needs {field}={getattr(md, field)} bytes; "
                           "the TensorRT AOT plugin passes only inputs, scalars and outputs, so "
                           "it cannot provide scratch memory")
    if md.shared > MAX_STATIC_SHARED:
        raise AotError(f"Triton kernel {md.name} needs {md.shared} bytes of shared memory, over "
                       f"the {MAX_STATIC_SHARED} a launch gets without opting in")
    ptx, hidden = _drop_hidden_params(compiled.asm["ptx"], md.name)
    return AotKernel(md.name, ptx, cc, md.num_warps, md.shared, cfg, hidden)


def write_ptx_bundle(folder, dtypes=tuple(TRITON_DTYPES), head_dim: int = 64, window: int = 0,
                     scale: float | None = None, ccs=BUNDLE_TARGETS) -> list[Path]:
    """Write `<name>.<dtype>.sm_<cc>.ptx` for every dtype and target, plus `index.json` with the
    launch metadata of each file; return the paths written (index last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scale = head_dim ** -0.5 if scale is None else scale
    index, paths = [], []
    for cc in ccs:
        for dtype in dtypes:
            k = compile_ptx(dtype, head_dim, window, scale, cc)
            path = folder / f"bounded_window_attention.{dtype}.sm_{cc}.ptx"
            path.write_text(k.ptx)
            paths.append(path)
            index.append({"file": path.name, "kernel_name": k.name, "cc": cc, "dtype": dtype,
                          "head_dim": head_dim, "window": window, "scale": scale,
                          "num_warps": k.num_warps, "block_threads": k.num_warps * 32,
                          "shared_mem": k.shared_mem, "block_m": k.config.block_m,
                          "block_n": k.config.block_n, "block_d": k.config.block_d,
                          "params": list(INPUT_ARGS + SCALAR_ARGS + OUTPUT_ARGS)})
    index_path = folder / "index.json"
    index_path.write_text(json.dumps(index, indent=2))
    return paths + [index_path]
