"""BoundedWindowAttention as a TensorRT plugin through `tensorrt.plugin` (QDP), namespace
`stagformer`, name `BoundedWindowAttention`, attributes `window: int`, `scale: float`.

    ok, why = plugin_supported()     can the installed TensorRT build AOT QDP plugins?
    register(cc=None)                define the plugin (idempotent); nothing happens on import

`register()` defines, with `tensorrt.plugin` imported only then:

    @trtp.register   output like q: [B, Hq, S, D], q's dtype
    @trtp.autotune   q, k_new, v_new, k_cache, v_cache, out share FP32|FP16|BF16; pos INT64*INT32
    @trtp.impl       JIT: the Triton launcher on TensorRT's stream (needs Python, torch, triton)
    @trtp.aot_impl   AOT: (kernel name, PTX from `plugins.aot`, KernelLaunchParams, SymIntExprs)
                     so engines run without Python (trtexec, C++)

Both implementations are defined, so the network must say which one to use: the ONNX node's
`aot` attribute (1 = AOT), `network.add_plugin(..., aot=True)`, or the network flag
PREFER_AOT_PYTHON_PLUGINS; otherwise plugin creation fails ("has both AOT and JIT
implementations"). The AOT PTX targets the compute capability given to `register(cc=...)`, else
$STAGCOMPILE_PLUGIN_CC, else the current GPU's. Window and scale are baked into the PTX.

Only the decorated callbacks touch TensorRT; the shape, dtype and launch logic they use are the
plain functions below and in `plugins.spec`, tested on CPU. This module must not use
`from __future__ import annotations`: `tensorrt.plugin` validates the callbacks' annotations
as live objects.
"""

import importlib.util
import os
from typing import List, Tuple, Union

from plugins import NAMESPACE, OP_NAME, spec

PLUGIN_ID = f"{NAMESPACE}::{OP_NAME}"
MIN_AOT_VERSION = (10, 9)
ENV_CC = "STAGCOMPILE_PLUGIN_CC"
FLOAT_TYPES = "FP32|FP16|BF16"      # AutoTuneCombination names, dependent choice ('|')
POS_TYPES = "INT64*INT32"           # independent choice ('*')
# trt.DataType member names -> spec dtype names (spec.FLOAT_DTYPES, spec.POS_DTYPES)
DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
               "INT32": "int32"}

_state = {"registered": False, "cc": None}


def version_supported(version: str) -> tuple[bool, str]:
    from packaging.version import Version  # a dependency of onnxruntime

    if Version(version).release[:2] < MIN_AOT_VERSION:
        need = ".".join(map(str, MIN_AOT_VERSION))
        return False, (f"TensorRT {version} is too old: AOT QDP plugins (tensorrt.plugin.aot_impl) "
                       f"need TensorRT {need} or newer")
    return True, f"TensorRT {version}"


def plugin_supported() -> tuple[bool, str]:
    """(True, description) when `register()` can work here, else (False, the reason)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        rtx = any(importlib.util.find_spec(m) for m in ("tensorrt_rtx", "tensorrt_rtx_bindings"))
        extra = (" (TensorRT-RTX is installed, but it has no tensorrt.plugin / QDP module)"
                 if rtx else "")
        return False, f"the tensorrt package is not importable: {e}{extra}"
    ok, why = version_supported(trt.__version__)
    if not ok:
        return False, why
    try:
        import tensorrt.plugin as trtp
    except (ImportError, OSError) as e:
        return False, f"TensorRT {trt.__version__} has no usable tensorrt.plugin module: {e}"
    if not hasattr(trt, "QuickPluginCreationRequest") or not hasattr(trtp, "aot_impl"):
        return False, f"TensorRT {trt.__version__} was built without AOT QDP support"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed; aot_impl compiles the kernel to PTX with it"
    return True, f"{why} with AOT tensorrt.plugin support"


def dtype_name(trt_dtype) -> str:
    """trt.DataType -> 'float32' | 'float16' | 'bfloat16' | 'int64' | 'int32'."""
    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in DTYPE_NAMES:
        raise spec.AttentionSpecError(f"BoundedWindowAttention: TensorRT type {name} not supported")
    return DTYPE_NAMES[name]


def autotune_io_types() -> str:
    """One AutoTuneCombination string: 6 inputs then the output."""
    return ", ".join([FLOAT_TYPES] * 5 + [POS_TYPES, FLOAT_TYPES])


def check_ranks(ranks) -> None:
    """Ranks of the six inputs, in spec order (what register can check on symbolic shapes)."""
    for name, rank in zip(spec.INPUT_NAMES, ranks, strict=True):
        want = 1 if name == "pos" else 4
        if rank != want:
            raise spec.AttentionSpecError(f"BoundedWindowAttention input {name}: expected rank "
                                          f"{want}, got rank {rank}")


def constant_head_dim(q_shape_expr) -> int:
    """D must be a build-time constant: it is baked into the PTX."""
    d = q_shape_expr[3]
    if d.is_fake or not d.is_constant:
        raise spec.AttentionSpecError("BoundedWindowAttention: the head dim of q (axis 3) must be "
                                      "static for the AOT plugin; export it with a fixed size")
    return d.constant_value()


def target_cc() -> int:
    """Compute capability to compile PTX for: register(cc=...), $STAGCOMPILE_PLUGIN_CC, or the
    current GPU's."""
    if _state["cc"]:
        return _state["cc"]
    if os.environ.get(ENV_CC):
        return int(os.environ[ENV_CC])
    from triton.runtime import driver

    try:
        return int(driver.active.get_current_target().arch)
    except Exception as e:
        raise RuntimeError(f"cannot detect the GPU's compute capability ({e}); pass "
                           f"register(cc=...) or set ${ENV_CC}, e.g. 87 or 90") from e


def aot_launch(q_shape, k_new_shape, k_cache_shape, block_m: int) -> tuple[tuple, tuple]:
    """(grid (x, y, z), scalar kernel args) from shapes: ints or TensorRT shape expressions."""
    scalars = spec.size_args(q_shape, k_new_shape, k_cache_shape)    # B, Hq, Hkv, S, C
    return spec.launch_grid_of(*scalars[:4], block_m), scalars


def _as_torch(t):
    """A torch view of a trtp.Tensor. Its __cuda_array_interface__ refuses BF16, so BF16 memory
    is described as int16 and reinterpreted."""
    import torch

    if dtype_name(t.dtype) != "bfloat16":
        return torch.as_tensor(t, device="cuda")

    class _Int16View:
        __cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i2", "version": 3,
                                    "data": (t.data_ptr, False),
                                    "strides": tuple(2 * s for s in t.strides)}

    return torch.as_tensor(_Int16View(), device="cuda").view(torch.bfloat16)


def register(cc: int | None = None) -> None:
    """Define the plugin with TensorRT (once per process). `cc` sets the AOT target."""
    if cc is not None:
        _state["cc"] = int(cc)
    if _state["registered"]:
        return
    ok, why = plugin_supported()
    if not ok:
        raise RuntimeError(f"cannot register the {PLUGIN_ID} TensorRT plugin: {why}")
    import tensorrt.plugin as trtp

    if hasattr(trtp.op, NAMESPACE) and hasattr(getattr(trtp.op, NAMESPACE), OP_NAME):
        _state["registered"] = True         # defined earlier in this process (module reloaded)
        return

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
              k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, pos: trtp.TensorDesc,
              window: int, scale: float) -> trtp.TensorDesc:
        inputs = (q, k_new, v_new, k_cache, v_cache, pos)
        check_ranks([t.ndim for t in inputs])
        spec.check_dtypes(*(dtype_name(t.dtype) for t in inputs))
        spec.check_attrs(window, scale)
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                  k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, pos: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_io_types())]

    @trtp.impl(PLUGIN_ID)
    def _impl(q: trtp.Tensor, k_new: trtp.Tensor, v_new: trtp.Tensor, k_cache: trtp.Tensor,
              v_cache: trtp.Tensor, pos: trtp.Tensor, window: int, scale: float,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from plugins.triton_kernel import bounded_window_attention_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [_as_torch(t) for t in (q, k_new, v_new, k_cache, v_cache, pos)]
            bounded_window_attention_triton(*args, window=window, scale=scale,
                                            out=_as_torch(outputs[0]))

    @trtp.aot_impl(PLUGIN_ID)
    def _aot_impl(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                  k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, pos: trtp.TensorDesc,
                  window: int, scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int
                  ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                             trtp.SymExprs]:
        from plugins.aot import compile_ptx

        kernel = compile_ptx(dtype_name(q.dtype), constant_head_dim(q.shape_expr), window, scale,
                             target_cc(), pos_dtype=dtype_name(pos.dtype))
        grid, scalars = aot_launch(q.shape_expr, k_new.shape_expr, k_cache.shape_expr,
                                   kernel.config.block_m)
        launch = trtp.KernelLaunchParams(grid_x=grid[0], grid_y=grid[1], grid_z=grid[2],
                                         block_x=kernel.num_warps * 32,
                                         shared_mem=kernel.shared_mem)
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return kernel.name, kernel.ptx, launch, extra_args

    _state["registered"] = True
