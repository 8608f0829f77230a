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
the 12 parameters the plugin supplies (`AotKernel.hidden_params` records what was dropped):
a launch with fewer kernel arguments than the entry declares would read past TensorRT's
argument array, one with more is harmless.

PTX version. By default Triton stamps the newest PTX ISA its bundled ptxas knows (8.8 for sm_87
and 9.4 for sm_90 with triton 3.9), which a driver older than that CUDA release cannot JIT
(CUDA_ERROR_UNSUPPORTED_PTX_VERSION). `compile_ptx` pins the oldest ISA that knows the target
instead (`MIN_PTX_VERSION`: 7.4 for sm_87, 8.0 for sm_90); pass `ptx_version` to override.

Triton >= 3.3 (`MIN_TRITON`): its `ASTSource` takes the signature by name with constexprs in it
and `attrs` as a dict; 3.2 took an `AttrsDescriptor`.

Shared memory is kept under 48 KiB (`MAX_STATIC_SHARED`): a launch needs an explicit opt-in
(cudaFuncSetAttribute) for more, and TensorRT's documentation does not say that it opts in.
"""

import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys
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
MAX_STATIC_SHARED = 48 * 1024               # per block without an opt-in (see module doc)
MIN_TRITON = (3, 3)                         # the ASTSource API used below (see module doc)

# Oldest PTX ISA (x10) that knows each target, as Triton compiles it (sm_90 -> sm_90a, which
# needs 8.0): CUDA 10.1 / 11.0 / 11.1 / 11.4 / 11.8 / 12.0 / 12.8. Each assembles with ptxas here.
MIN_PTX_VERSION = {75: 64, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 120: 87}


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


def check_triton_version(version: str) -> None:
    from packaging.version import Version  # a dependency of onnxruntime

    if Version(version).release[:2] < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        raise AotError(f"triton {version} is too old for AOT compilation: it needs triton >= "
                       f"{need} (ASTSource with dict attrs); pip install 'triton>={need}'")


def default_ptx_version(cc: int) -> int | None:
    """PTX ISA version pinned for sm_<cc> (e.g. 80 = 8.0); None: Triton's default."""
    return MIN_PTX_VERSION.get(cc)


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


def _drop_hidden_params(ptx: str, name: str, num_params: int = NUM_PARAMS) -> tuple[str, int]:
    """Remove the trailing `.param` lines after the `num_params` real ones, after checking none
    is read."""
    params = re.findall(rf"^\s*\.param [^\n]*\b({name}_param_(\d+))\s*,?\s*$", ptx, flags=re.M)
    hidden = [p for p, i in params if int(i) >= num_params]
    if len(params) - len(hidden) != num_params:
        raise AotError(f"PTX entry {name} declares {len(params)} parameters; expected "
                       f"{num_params} (+ hidden Triton scratch pointers)")
    for p in hidden:
        if re.search(rf"\[{p}\]", ptx):
            raise AotError(f"PTX entry {name} reads hidden parameter {p}; its launcher cannot "
                           "pass it")
    if not hidden:
        return ptx, 0
    ptx = re.sub(rf"^\s*\.param [^\n]*\b({'|'.join(hidden)})\s*,?\s*\n", "", ptx, flags=re.M)
    last = f"{name}_param_{num_params - 1}"
    ptx = re.sub(rf"(\b{last}),(\s*\n\s*\))", r"\1\2", ptx)
    return ptx, len(hidden)


def checked_ptx_version(cc: int, ptx_version: int | None) -> int | None:
    """`ptx_version`, else the pinned default for sm_<cc>; refused when too old for the target
    (LLVM would abort the process)."""
    ptx_version = ptx_version or default_ptx_version(cc)
    if ptx_version and ptx_version < MIN_PTX_VERSION.get(cc, 0):
        raise AotError(f"PTX ISA {ptx_version / 10:.1f} cannot target sm_{cc}; it needs "
                       f"{MIN_PTX_VERSION[cc] / 10:.1f} or newer")
    return ptx_version


@functools.lru_cache(maxsize=None)
def compile_ptx(dtype: str, head_dim: int, window: int, scale: float, cc: int,
                pos_dtype: str = "int64", ptx_version: int | None = None) -> AotKernel:
    """Compile the kernel for sm_<cc> with window and scale baked in as constants."""
    spec.check_dtypes(dtype, dtype, dtype, dtype, dtype, pos_dtype)
    spec.check_attrs(window, scale)
    spec.check_head_dim(head_dim)
    args = (dtype, head_dim, window, float(scale), cc, pos_dtype,
            checked_ptx_version(cc, ptx_version))
    return native_compile("plugins.aot", "_compile_here", args, lambda fields: AotKernel(
        **{**fields, "config": spec.KernelConfig(**fields["config"])}))


def _compile_here(dtype, head_dim, window, scale, cc, pos_dtype, ptx_version) -> AotKernel:
    from plugins.triton_kernel import jit_kernel

    signature, constexprs, attrs = kernel_signature(dtype, head_dim, pos_dtype)
    constexprs.update(WINDOW=window, SCALE=scale)
    cfg = spec.kernel_config(dtype, head_dim)
    md, ptx, hidden = compile_triton(jit_kernel(), signature, constexprs, attrs, cc,
                                     cfg.num_warps, cfg.num_stages, ptx_version, NUM_PARAMS)
    return AotKernel(md.name, ptx, cc, md.num_warps, md.shared, cfg, hidden)


def compile_triton(fn, signature: dict, constexprs: dict, attrs: dict, cc: int, num_warps: int,
                   num_stages: int, ptx_version: int | None, num_params: int):
    """(metadata, PTX, hidden params dropped) of a Triton JITFunction compiled for sm_<cc>; the
    kernel must need no scratch memory and at most MAX_STATIC_SHARED bytes of shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True,
               "ptx_version": ptx_version}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    md = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, field, 0):
            raise AotError(f"Triton kernel {md.name} needs {field}={getattr(md, field)} bytes; "
                           "its launcher passes only the declared arguments, so it cannot "
                           "provide scratch memory")
    if md.shared > MAX_STATIC_SHARED:
        raise AotError(f"Triton kernel {md.name} needs {md.shared} bytes of shared memory, over "
                       f"the {MAX_STATIC_SHARED} a launch gets without opting in")
    ptx, hidden = _drop_hidden_params(compiled.asm["ptx"], md.name, num_params)
    return md, ptx, hidden


_CHILD = """
import dataclasses, importlib, json, sys
module, func, args = json.loads(sys.argv[1])
print(json.dumps(dataclasses.asdict(getattr(importlib.import_module(module), func)(*args))))
"""


def native_compile(module: str, func: str, args: tuple, rebuild):
    """`module.func(*args)` (a native Triton compilation returning a dataclass), here or, when
    this process imported triton in interpreter mode (Triton's own `tl` helpers are interpreted
    functions then), in a fresh Python without TRITON_INTERPRET; `rebuild(fields)` makes the
    child's result back into the dataclass."""
    import triton

    from plugins.triton_kernel import interpreter_mode

    check_triton_version(triton.__version__)
    if not interpreter_mode():
        return getattr(importlib.import_module(module), func)(*args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([module, func, args])],
                         env=env, capture_output=True, text=True)
    if run.returncode:
        raise AotError(f"PTX compilation {func}{args} failed in the child process:\n{run.stderr}")
    return rebuild(json.loads(run.stdout.strip().splitlines()[-1]))


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
