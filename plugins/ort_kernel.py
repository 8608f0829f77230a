"""ONNX Runtime kernel for the `stagformer::BoundedWindowAttention` node (onnxruntime-extensions).

`session_options()` returns SessionOptions with the extensions library registered, after the
Python op below is defined; graphs of the plugin flavour then run on CPU. The kernel is the numpy
definition (`plugins.numpy_ref`), so it needs no torch.

Limits (onnxruntime-extensions 0.15): Python custom ops support float32 here; float16 aborts the
process inside ONNX Runtime and cannot be caught, so fp16/bf16 plugin graphs are refused up front
(`check_graph_dtype`). The op body holds the GIL: plugin-flavour graphs are for validation on CPU,
not for speed (the runtime runs the portable flavour on ONNX Runtime).
"""

from __future__ import annotations

from functools import lru_cache

from plugins import NAMESPACE, OP_NAME

SUPPORTED_DTYPES = ("float32",)


class OrtKernelUnavailable(RuntimeError):
    """onnxruntime-extensions is missing, or the graph's dtype is not supported."""


@lru_cache(maxsize=None)
def register() -> str:
    try:
        import onnxruntime_extensions as ortx
    except ImportError:
        raise OrtKernelUnavailable("onnxruntime-extensions is not installed; "
                                   "pip install onnxruntime-extensions") from None
    from onnxruntime_extensions import PyOp, onnx_op

    from plugins.numpy_ref import bounded_window_attention

    @onnx_op(op_type=f"{NAMESPACE}::{OP_NAME}",
             inputs=[PyOp.dt_float] * 5 + [PyOp.dt_int64], outputs=[PyOp.dt_float],
             attrs={"window": PyOp.dt_int64, "scale": PyOp.dt_float,
                    "plugin_namespace": PyOp.dt_string, "aot": PyOp.dt_int64})
    def _kernel(q, k_new, v_new, k_cache, v_cache, pos, **attrs):
        return bounded_window_attention(q, k_new, v_new, k_cache, v_cache, pos,
                                        int(attrs["window"]), float(attrs["scale"]))

    return ortx.get_library_path()


def session_options(base=None):
    """ONNX Runtime SessionOptions able to run plugin-flavour graphs."""
    import onnxruntime as ort
    so = base if base is not None else ort.SessionOptions()
    so.register_custom_ops_library(register())
    return so


def check_graph_dtype(dtype: str, where: str = "graph") -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise OrtKernelUnavailable(
            f"{where}: the ONNX Runtime kernel of the plugin node runs {', '.join(SUPPORTED_DTYPES)} "
            f"only (onnxruntime-extensions aborts on {dtype}); use the portable flavour or TensorRT")
