"""The portable expression of BoundedWindowAttention: standard ONNX operators, mask from `pos`.

`function_proto()` is an ONNX function (domain "stagformer", name "BoundedWindowAttention")
written with onnxscript; `to_portable(model)` replaces every plugin node of a graph by that
function's body (onnx's inliner), so the same exported graph becomes one that runs in any ONNX
Runtime and any TensorRT, no plugin needed. Identical mask subgraphs of different layers are
merged afterwards by common-subexpression elimination. Cost is O(C + S) per query (every ring
slot is scored, then masked); the cache is never copied.

    q [B,Hq,S,D] --Reshape--> qg [B,Hkv,G*S,D]
    qg @ k_cache^T [B,Hkv,G*S,C] ++ qg @ k_new^T [B,Hkv,G*S,S] --Cast fp32, *scale--> scores
    pos --> key positions [B,C+S] (slot c: pos-1-((pos+C-1-c) mod C); new j: pos+j)
        --> mask [B,1,S,C+S] (k <= q, k >= 0, window == 0 or k > q - window) --Tile G--> [B,1,G*S,C+S]
    Softmax(Where(mask, scores, -inf)) --Cast--> probs [B,Hkv,G*S,C+S]
    probs[..., :C] @ v_cache + probs[..., C:] @ v_new --Reshape--> out [B,Hq,S,D]
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
                               scale: float, kv_heads: int, group: int, dtype: int):
        zero = op.Constant(value_ints=[0])
        one = op.Constant(value_ints=[1])
        two = op.Constant(value_ints=[2])
        three = op.Constant(value_ints=[3])
        heads = op.Constant(value_int=kv_heads)
        target = op.Concat(zero, op.Reshape(heads, one), op.Constant(value_ints=[-1, 0]), axis=0)
        qg = op.Reshape(q, target)                                      # [B, Hkv, G*S, D]
        c = op.Shape(k_cache, start=2, end=3)
        s = op.Shape(q, start=2, end=3)
        cached = op.MatMul(qg, op.Transpose(k_cache, perm=[0, 1, 3, 2]))  # [B, Hkv, G*S, C]
        fresh = op.MatMul(qg, op.Transpose(k_new, perm=[0, 1, 3, 2]))     # [B, Hkv, G*S, S]
        scores = op.Mul(op.Cast(op.Concat(cached, fresh, axis=3), to=FLOAT.dtype),
                        op.Constant(value_float=scale))                 # [B, Hkv, G*S, C+S]
        p = op.Unsqueeze(op.Cast(pos, to=7), one)                      # [B, 1] int64
        c0 = op.Squeeze(c, zero)
        slots = op.Range(op.Constant(value_int=0), c0, op.Constant(value_int=1))  # [C]
        ring = op.Mod(op.Sub(op.Sub(op.Add(p, c0), one), slots), c0)   # [B, C]
        cache_pos = op.Sub(op.Sub(p, one), ring)                        # [B, C]
        new_pos = op.Add(p, op.Range(op.Constant(value_int=0), op.Squeeze(s, zero),
                                     op.Constant(value_int=1)))        # [B, S]
        kpos = op.Unsqueeze(op.Concat(cache_pos, new_pos, axis=1), one)  # [B, 1, C+S]
        qpos = op.Unsqueeze(new_pos, two)                               # [B, S, 1]
        w = op.Constant(value_int=window)
        causal = op.And(op.LessOrEqual(kpos, qpos), op.GreaterOrEqual(kpos, zero))
        inside = op.Or(op.Equal(w, zero), op.Greater(kpos, op.Sub(qpos, w)))
        mask = op.Unsqueeze(op.And(causal, inside), one)                # [B, 1, S, C+S]
        reps = op.Concat(one, one, op.Reshape(op.Constant(value_int=group), one), one, axis=0)
        mask = op.Tile(mask, reps)                                      # [B, 1, G*S, C+S]
        probs = op.Softmax(op.Where(mask, scores, op.Constant(value_float=float("-inf"))),
                           axis=-1)
        probs = op.Cast(probs, to=dtype)
        out = op.Add(op.MatMul(op.Slice(probs, zero, c, three), v_cache),
                     op.MatMul(op.Slice(probs, c, op.Constant(value_ints=[2**62]), three), v_new))
        return op.Reshape(out, op.Shape(q))                             # [B, Hq, S, D]

    return BoundedWindowAttention.to_function_proto()


def _head_counts(model) -> dict[str, tuple[int, int]]:
    """Static dimension 1 (heads) and element type of every rank-4 value (shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    heads = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            heads[vi.name] = (dims[1].dim_value, vi.type.tensor_type.elem_type)
    return heads


def to_portable(model):
    """Return a copy of an onnx ModelProto with every plugin node inlined to standard ops.

    Each node's head counts (static in every stagcompile graph) become the function's
    `kv_heads` and `group` attributes (and q's element type `dtype`), so the inlined reshapes,
    mask tiling and casts are constants."""
    import onnx
    import onnx.inliner

    out = onnx.ModelProto()
    out.CopyFrom(model)
    heads = _head_counts(out)
    for node in out.graph.node:
        if node.domain == NAMESPACE and node.op_type == OP_NAME:
            (hq, dtype), (hkv, _) = heads.get(node.input[0], (0, 0)), heads.get(node.input[1], (0, 0))
            if not hq or not hkv:
                raise ValueError(f"{node.name}: the head counts of q and k_new must be static")
            keep = [a for a in node.attribute if a.name in ("window", "scale")]
            del node.attribute[:]
            node.attribute.extend(keep + [onnx.helper.make_attribute("kv_heads", hkv),
                                          onnx.helper.make_attribute("group", hq // hkv),
                                          onnx.helper.make_attribute("dtype", dtype)])
    out.functions.append(function_proto())
    out = onnx.inliner.inline_local_functions(out)
    for i, imp in enumerate(out.opset_import):
        if imp.domain == NAMESPACE:
            del out.opset_import[i]
            break
    return out
