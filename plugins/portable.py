"""The portable expression of BoundedWindowAttention: standard ONNX operators, mask from `pos`.

`FUNCTION` is an ONNX function (domain "stagformer", name "BoundedWindowAttention") written with
onnxscript; `to_portable(model)` replaces every plugin node of a graph by that function's body
(onnx's inliner), so the same exported graph becomes one that runs in any ONNX Runtime and any
TensorRT, no plugin needed. Identical mask subgraphs of different layers are merged afterwards
by the optimizer's common-subexpression elimination.

    q [B,Hq,S,D] --Reshape--> [B,Hkv,G*S,D] --MatMul(keys^T)--> scores [B,Hkv,G*S,C+S]
    keys = Concat(k_cache, k_new) [B,Hkv,C+S,D]           |Cast fp32, *scale, Reshape [B,Hkv,G,S,C+S]
    pos --> key positions [B,C+S] (slot c: pos-1-((pos+C-1-c) mod C); new j: pos+j)
        --> mask [B,1,1,S,C+S] (k <= q, k >= 0, window == 0 or k > q - window) --Where(-inf)--> Softmax
    probs --CastLike q, Reshape [B,Hkv,G*S,C+S]--> MatMul(values) --Reshape--> out [B,Hq,S,D]
"""

from __future__ import annotations

from functools import lru_cache

from plugins import NAMESPACE, OP_NAME


@lru_cache(maxsize=None)
def function_proto():
    """The op as an onnx FunctionProto with attributes `window` (int) and `scale` (float)."""
    import onnxscript
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    domain = onnxscript.values.Opset(NAMESPACE, 1)

    @onnxscript.script(domain, default_opset=op)
    def BoundedWindowAttention(q, k_new, v_new, k_cache, v_cache, pos, window: int,
                               scale: float):
        keys = op.Concat(k_cache, k_new, axis=2)                       # [B, Hkv, C+S, D]
        values = op.Concat(v_cache, v_new, axis=2)                     # [B, Hkv, C+S, D]
        q_shape = op.Shape(q)
        b = op.Shape(q, start=0, end=1)
        s = op.Shape(q, start=2, end=3)
        d = op.Shape(q, start=3, end=4)
        hkv = op.Shape(k_new, start=1, end=2)
        c = op.Shape(k_cache, start=2, end=3)
        g = op.Div(op.Shape(q, start=1, end=2), hkv)
        total = op.Add(c, s)
        qg = op.Reshape(q, op.Concat(b, hkv, op.Mul(g, s), d, axis=0))  # [B, Hkv, G*S, D]
        raw = op.MatMul(qg, op.Transpose(keys, perm=[0, 1, 3, 2]))     # [B, Hkv, G*S, C+S]
        scores = op.Mul(op.Cast(raw, to=FLOAT.dtype), op.Constant(value_float=scale))
        scores = op.Reshape(scores, op.Concat(b, hkv, g, s, total, axis=0))  # [B,Hkv,G,S,C+S]
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        p = op.Unsqueeze(op.Cast(pos, to=7), [1])                      # [B, 1] int64
        c0 = op.Squeeze(c, [0])
        s0 = op.Squeeze(s, [0])
        slots = op.Range(zero, c0, one)                                 # [C]
        ring = op.Mod(op.Sub(op.Sub(op.Add(p, c0), one), slots), c0)   # [B, C]
        cache_pos = op.Sub(op.Sub(p, one), ring)                        # [B, C]
        new_pos = op.Add(p, op.Range(zero, s0, one))                    # [B, S]
        kpos = op.Unsqueeze(op.Concat(cache_pos, new_pos, axis=1), [1])  # [B, 1, C+S]
        qpos = op.Unsqueeze(new_pos, [2])                               # [B, S, 1]
        w = op.Constant(value_int=window)
        causal = op.And(op.LessOrEqual(kpos, qpos), op.GreaterOrEqual(kpos, zero))
        inside = op.Or(op.Equal(w, zero), op.Greater(kpos, op.Sub(qpos, w)))
        mask = op.Unsqueeze(op.And(causal, inside), [1, 2])             # [B, 1, 1, S, C+S]
        neg_inf = op.Constant(value_float=float("-inf"))
        probs = op.Softmax(op.Where(mask, scores, neg_inf), axis=-1)
        probs = op.Reshape(op.CastLike(probs, q),
                           op.Concat(b, hkv, op.Mul(g, s), total, axis=0))  # [B,Hkv,G*S,C+S]
        return op.Reshape(op.MatMul(probs, values), q_shape)            # [B, Hq, S, D]

    return BoundedWindowAttention.to_function_proto()


def to_portable(model):
    """Return a copy of an onnx ModelProto with every plugin node inlined to standard ops."""
    import onnx
    import onnx.inliner

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == NAMESPACE and node.op_type == OP_NAME:
            keep = [a for a in node.attribute if a.name in ("window", "scale")]
            del node.attribute[:]
            node.attribute.extend(keep)
    out.functions.append(function_proto())
    out = onnx.inliner.inline_local_functions(out)
    for i, imp in enumerate(out.opset_import):
        if imp.domain == NAMESPACE:
            del out.opset_import[i]
            break
    return out
