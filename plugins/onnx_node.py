"""The ONNX form of BoundedWindowAttention and how torch.onnx produces it.

    node   op_type "BoundedWindowAttention", domain "stagformer" (opset import stagformer v1)
    inputs q, k_new, v_new, k_cache, v_cache, pos      output out
    attrs  window (INT), scale (FLOAT)                 -> the op's attributes
           plugin_namespace = "stagformer" (STRING)    -> the TensorRT ONNX parser maps the node
           aot = 1 (INT)                                  to the `tensorrt.plugin` creator
                                                          stagformer::BoundedWindowAttention and
                                                          selects its AOT implementation

`register_schema()` registers the node's ONNX OpSchema (type constraints, attributes) so
onnx.checker, shape inference and onnxscript know it. `plugin_op` is a torch custom op
(`torch.ops.stagformer.bounded_window_attention`) whose eager and fake kernels are the
reference; `TRANSLATION` maps it to the node for `torch.onnx.export(custom_translation_table=...)`.
Inside `plugin_flavour()` the reference model calls that custom op instead of the reference, so
the same modules export either flavour.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

from plugins import NAMESPACE, OP_NAME, dispatch

DOMAIN = NAMESPACE
DOMAIN_VERSION = 1
INPUTS = ("q", "k_new", "v_new", "k_cache", "v_cache", "pos")


@lru_cache(maxsize=None)
def register_schema() -> None:
    from onnx import defs

    if defs.has(OP_NAME, DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc="Bounded-window attention over a ring-buffer KV cache (see stagcompile plugins/).",
        inputs=[param(n, "I" if n == "pos" else "T") for n in INPUTS],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "query/key/value dtype"),
                          ("I", ["tensor(int64)", "tensor(int32)"], "position dtype")],
        attributes=[attr("window", kind.INT, "0 = unbounded, else the window length"),
                    attr("scale", kind.FLOAT, "softmax scale"),
                    attr("plugin_namespace", kind.STRING, "TensorRT plugin namespace", required=False),
                    attr("aot", kind.INT, "1: TensorRT AOT implementation", required=False)])
    defs.register_schema(schema)


@lru_cache(maxsize=None)
def plugin_op():
    """The torch custom op behind the plugin flavour (eager kernel = the reference)."""
    import torch

    from plugins.reference import bounded_window_attention

    schema = ("(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache, "
              "Tensor pos, int window, float scale) -> Tensor")

    @torch.library.custom_op(f"{NAMESPACE}::bounded_window_attention", mutates_args=(),
                             schema=schema)
    def op(q, k_new, v_new, k_cache, v_cache, pos, window, scale):
        return bounded_window_attention(q, k_new, v_new, k_cache, v_cache, pos, window, scale)

    @op.register_fake
    def _(q, k_new, v_new, k_cache, v_cache, pos, window, scale):
        return torch.empty_like(q)

    return op


def translation_table() -> dict:
    """custom_translation_table entry mapping the custom op to the ONNX node."""
    import onnxscript
    import torch

    register_schema()
    plugin_op()
    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def to_node(q, k_new, v_new, k_cache, v_cache, pos, window: int, scale: float):
        node = getattr(opset, OP_NAME)
        return node(q, k_new, v_new, k_cache, v_cache, pos, window=window, scale=scale,
                    plugin_namespace=NAMESPACE, aot=1)

    return {torch.ops.stagformer.bounded_window_attention.default: to_node}


@contextmanager
def plugin_flavour():
    """Make the reference model call the custom op (one ONNX node per attention)."""
    op = plugin_op()
    with dispatch.using(lambda q, kn, vn, kc, vc, pos, window, scale:
                        op(q, kn, vn, kc, vc, pos, int(window), float(scale))):
        yield
