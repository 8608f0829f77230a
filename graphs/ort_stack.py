"""The `ort` flavour: one stack's graph built from its weights with ONNX Runtime's contrib ops.

Where `graphs.stack` is traced from the reference model, this graph is assembled node by node
(onnx_ir), in the shape ONNX Runtime GenAI's model builder gives a Llama: fused projections,
`com.microsoft` GroupQueryAttention that appends to its cache in place, SkipSimplifiedLayer-
Normalization for every residual add + RMSNorm (the first norm of the stack, which has no add,
is opset 23's RMSNormalization). About 12 nodes per layer instead of about 75.
It computes exactly the reference's stack step (DESIGN section 1); tests hold it to the golden
trace like the other flavours. I/O names and shapes: `graphs.io.ort_stack_io`.

Once per graph (positions of the S new tokens are pos .. pos+S-1 in every row):

    pos, S ─> seqlens_k = pos + S - 1 (int32), total = max(pos) + S, query_seqlens = S
              rope tables: cos/sin of the reference's angles (fp32 position x inverse frequency)

One layer of stack k (k > 1 adds the middle block; `x` is the residual stream):

    x ─SkipSLN(attn_norm)─> h ─MatMul[Wq|Wk|Wv]─> qkv ─GQA(self cache, in place)─> MatMul Wo ─> o
    o, x ─SkipSLN(cross norm)─> h ─MatMul Wq─> q ─GQA(cross_in entries, cross cache)─> MatMul Wo ─> o
    o, x ─SkipSLN(mlp_norm)─> h ─MatMul[W1|W3]─> Split ─> g*sigmoid(g)*u ─MatMul W2─> m
    m, x ─SkipSLN(next layer's attn_norm | mem_norm | norm_f)─> ...

Tail: a producer stack projects its normalised output with the consumer's [Wk|Wv] into
`cross_out.*` (entries pos+1 .. pos+S, keys unrotated: the consumer's GroupQueryAttention rotates
them at their memory position) and emits the null entry (a constant, broadcast to the batch);
the last stack applies norm_f and the LM head to the last position only.

Attention paths, by window (each recorded in the manifest):
- unbounded: a cache of max_seq_len rows, appended at row p;
- window W: GroupQueryAttention's sliding-window cache (`sliding_window_cache=1`,
  `local_window_size=W`: the query at p attends p-W+1 .. p, exactly the reference) of 2W rows;
  it keeps the latest positions contiguous and compacts by itself, so memory stays constant.
First layer (`qkv_table`): the first layer's attention input RMSNorm(E[t]) * g depends on the token
alone, so its fused projection can be a table of every token's row, precomputed at export
(float64, then the graph dtype): one Gather of a [vocab, (H + 2 Hkv) D] row replaces the first
RMSNormalization and the first MatMul, and the step reads one row instead of the d x (H + 2 Hkv) D
weight. It costs vocab / d_model times that weight's memory, so `qkv_table_auto` takes it when
vocab <= 16 d_model on unquantized graphs (the manifest says which path each bundle uses).
With `cross_gate` the gate is folded into the cross-attention's output projection
(tanh(gate) * Wo). RoPE: when every attention is windowed (the model may run past max_seq_len) the tables are
computed per step from `pos` and applied by RotaryEmbedding nodes; otherwise GroupQueryAttention
rotates with fixed tables of max_seq_len positions.
"""

from __future__ import annotations

import numpy as np

from graphs.io import GraphIO, ort_stack_io

MS = "com.microsoft"
OPSET = 23          # RMSNormalization (the first norm); every other node is a contrib op or older
ONNX_DTYPES = {"float32": "FLOAT", "float16": "FLOAT16"}


QKV_TABLE_MAX_RATIO = 16   # auto: the table costs vocab / d_model times the weight it replaces


def qkv_table_auto(cfg, quant: str | None) -> bool:
    """Whether an export takes the first-layer QKV table by default."""
    return quant is None and cfg.vocab_size <= QKV_TABLE_MAX_RATIO * cfg.d_model


def rope_mode(cfg) -> str:
    """"step" (per-step tables, positions unbounded) or "table" (fixed tables)."""
    return "step" if cfg.unbounded_length else "table"


def _t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)                   # torch Linear [out, in] -> MatMul [in, out]


class _Builder:
    """Accumulates the nodes and initializers of one graph."""

    def __init__(self, io: GraphIO, dtype: str):
        import onnx_ir as ir
        from onnx_ir import tape

        self.ir = ir
        self.np_dtype = np.dtype(dtype)
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET, MS: 1},
                              name=f"stack{io.stack}")
        self.tape = tape.Tape(self.graph)
        self.values = {}
        for t in io.inputs:
            v = ir.Value(name=t.name)
            self._describe(v, t)
            self.graph.inputs.append(v)
            self.values[t.name] = v
        self.io = io
        self.infos = {t.name: t for t in io.outputs}

    def _describe(self, value, info) -> None:
        kind = "INT64" if info.dtype == "int64" else ONNX_DTYPES[info.dtype]
        value.type = self.ir.TensorType(getattr(self.ir.DataType, kind))
        value.shape = self.ir.Shape(list(info.shape))

    def op(self, op_type: str, inputs, attrs=None, outputs: int = 1, domain: str = ""):
        if outputs == 1:
            return self.tape.op(op_type, inputs, attrs, domain=domain)
        return self.tape.op_multi_out(op_type, inputs, attrs, domain=domain,
                                      num_outputs=outputs)

    def const(self, name: str, arr: np.ndarray, cast: bool = False):
        """An initializer (one per name: later calls with the name reuse the first)."""
        if name not in self.values:
            arr = np.ascontiguousarray(arr.astype(self.np_dtype) if cast else arr)
            self.values[name] = self.tape.initializer(self.ir.tensor(arr, name=name))
        return self.values[name]

    def weight(self, name: str, arr: np.ndarray):
        return self.const(name, arr, cast=True)

    def output(self, value, name: str) -> None:
        value.name = name
        self._describe(value, self.infos[name])
        self.graph.outputs.append(value)

    def model(self):
        ordered = {t.name: i for i, t in enumerate(self.io.outputs)}
        self.graph.outputs.sort(key=lambda v: ordered[v.name])
        return self.ir.Model(self.graph, ir_version=10)


class OrtStackGraph:
    """Builds the ort-flavour graph of 0-based `stack` from a state dict of numpy arrays."""

    def __init__(self, cfg, weights: dict[str, np.ndarray], stack: int, dtype: str = "float32",
                 qkv_table: bool = False):
        if dtype not in ONNX_DTYPES:
            raise ValueError(f"the ort flavour supports {', '.join(ONNX_DTYPES)}, got {dtype}")
        self.cfg, self.w, self.k, self.dtype = cfg, weights, stack, dtype
        self.qkv_table = qkv_table
        self.io = ort_stack_io(cfg, stack, dtype)
        self.b = _Builder(self.io, dtype)
        self.trunk = f"trunks.{0 if cfg.shared_weights else stack}.layers"

    # ---- once per graph ------------------------------------------------------------------------
    def _step_values(self) -> None:
        b, cfg = self.b, self.cfg
        i64, i32 = self.b.ir.DataType.INT64, self.b.ir.DataType.INT32
        ids, pos = b.values["input_ids"], b.values["pos"]
        self.one = b.const("const.one", np.array([1], np.int64))
        seq = b.op("Shape", [ids], {"start": 1, "end": 2})                     # [1] = S
        end = b.op("Add", [pos, seq])                                          # [B] pos + S
        self.seqlens_k = b.op("Cast", [b.op("Sub", [end, self.one])], {"to": i32})
        self.total = b.op("Cast", [b.op("ReduceMax", [end], {"keepdims": 0})], {"to": i32})
        self.query_seqlens = b.op("Expand", [b.op("Cast", [seq], {"to": i32}),
                                             b.op("Shape", [pos])])           # [B] = S
        d = cfg.head_dim
        inv_freq = (np.float32(cfg.rope_theta)
                    ** (-np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))  # [D/2]
        if rope_mode(cfg) == "table":
            n = cfg.max_seq_len
            angles = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]  # [N, D/2]
            self.cos = b.const("rope.cos", np.cos(angles), cast=True)
            self.sin = b.const("rope.sin", np.sin(angles), cast=True)
            return
        zero = b.const("const.zero", np.array(0, np.int64))
        step = b.const("const.step", np.array(1, np.int64))
        offsets = b.op("Range", [zero, b.op("Squeeze", [seq]), step])         # [S]
        positions = b.op("Add", [b.op("Unsqueeze", [pos, self.one]), offsets])  # [B, S]
        angle = b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [positions], {"to": b.ir.DataType.FLOAT}),
                                                b.const("const.last", np.array([-1], np.int64))]),
                             b.const("rope.inv_freq", inv_freq)])             # [B, S, D/2]
        flat = b.op("Reshape", [angle, b.const("const.rows", np.array([-1, d // 2], np.int64))])
        cast = {"to": getattr(b.ir.DataType, ONNX_DTYPES[self.dtype])}
        self.cos = b.op("Cast", [b.op("Cos", [flat])], cast)                   # [B*S, D/2]
        self.sin = b.op("Cast", [b.op("Sin", [flat])], cast)
        rows = b.op("Squeeze", [b.op("Shape", [flat], {"start": 0, "end": 1})])
        self.position_ids = b.op("Reshape", [b.op("Range", [zero, rows, step]),
                                             b.op("Shape", [ids])])           # [B, S]: row b*S+s

    # ---- pieces ------------------------------------------------------------------------------
    def _rotate(self, x, heads: int):
        return self.b.op("RotaryEmbedding", [x, self.position_ids, self.cos, self.sin],
                         {"num_heads": heads, "rotary_embedding_dim": self.cfg.head_dim},
                         domain=MS)

    def _attention(self, q, k_new, v_new, past_k, past_v, window):
        """GroupQueryAttention over a cache updated in place; q/k_new unrotated. q is packed
        [q|k|v] when k_new is None."""
        cfg, b = self.cfg, self.b
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        attrs = {"num_heads": hq, "kv_num_heads": hkv, "scale": float(d ** -0.5),
                 "local_window_size": window or -1, "sliding_window_cache": 1 if window else 0}
        tables = [None, None]
        if rope_mode(cfg) == "table":
            attrs["do_rotary"] = 1
            tables = [self.cos, self.sin]
        else:
            if k_new is None:
                q, k_new, v_new = b.op("Split", [q, b.const(
                    "const.split_qkv", np.array([hq * d, hkv * d, hkv * d], np.int64))],
                    {"axis": -1}, outputs=3)
            q, k_new = self._rotate(q, hq), self._rotate(k_new, hkv)
        inputs = [q, k_new, v_new, past_k, past_v, self.seqlens_k, self.total, *tables,
                  None, None, None, None, None, None, None, self.query_seqlens]
        return b.op("GroupQueryAttention", inputs, attrs, outputs=3, domain=MS)

    def _skip_norm(self, delta, resid, weight_name: str):
        """(RMSNorm(resid + delta) * w, resid + delta)."""
        h, _, _, summed = self.b.op(
            "SkipSimplifiedLayerNormalization",
            [delta, resid, self.b.weight(weight_name, self.w[weight_name])],
            {"epsilon": self.cfg.norm_eps}, outputs=4, domain=MS)
        return h, summed

    def _linear(self, h, name: str, *parts: str):
        """h @ [W_part1 | W_part2 | ...] (one MatMul over the concatenated weights)."""
        return self.b.op("MatMul", [h, self.b.weight(name, self._fused(*parts))])

    @staticmethod
    def _qkv_parts(p: str) -> list[str]:
        return [f"{p}.attn.{n}.weight" for n in ("wq", "wk", "wv")]

    def _fused(self, *parts: str) -> np.ndarray:
        return np.concatenate([_t(self.w[p]) for p in parts], axis=1)      # [in, sum(out)]

    def _first_qkv(self, resid, p: str):
        """The first layer's fused Q|K|V of the stack input `resid` = E[input_ids]: the
        projection of its RMSNorm, or (qkv_table) a Gather from every token's precomputed row."""
        b, w, parts = self.b, self.w, self._qkv_parts(p)
        norm = f"{p}.attn_norm.weight"
        if not self.qkv_table:
            h = b.op("RMSNormalization", [resid, b.weight(norm, w[norm])],
                     {"epsilon": self.cfg.norm_eps, "axis": -1, "stash_type": 1})
            return self._linear(h, f"{p}.attn.wqkv", *parts)
        e = w["embed.weight"].astype(np.float64)                                # [V, d]
        h = e / np.sqrt(np.mean(e * e, axis=-1, keepdims=True) + self.cfg.norm_eps)
        table = (h * w[norm].astype(np.float64)) @ self._fused(*parts).astype(np.float64)
        table = b.weight("embed.qkv_table", table)                              # [V, N]
        return b.op("Gather", [table, b.values["input_ids"]])                   # [B, S, N]

    def _present(self, values, role: str, layer: int) -> None:
        for kv, v in zip("kv", values):
            self.b.output(v, f"present.{role}.{kv}.{layer}")

    # ---- the graph ---------------------------------------------------------------------------
    def build(self):
        cfg, b, w, k, tr = self.cfg, self.b, self.w, self.k, self.trunk
        self._step_values()
        embed = b.weight("embed.weight", w["embed.weight"])
        resid = b.op("Gather", [embed, b.values["input_ids"]])                 # [B, S, d]
        for l in range(cfg.layers_per_stack):
            p = f"{tr}.{l}"
            qkv = (self._first_qkv(resid, p) if l == 0 else
                   self._linear(h, f"{p}.attn.wqkv", *self._qkv_parts(p)))
            a, *present = self._attention(qkv, None, None, b.values[f"self.k.{l}"],
                                          b.values[f"self.v.{l}"], cfg.self_window)
            self._present(present, "self", l)
            o = self._linear(a, f"{p}.attn.wo", f"{p}.attn.wo.weight")
            if k > 0:
                o, resid = self._cross(l, o, resid)
            h, resid = self._skip_norm(o, resid, f"{p}.mlp_norm.weight")
            gate, up = b.op("Split", [self._linear(h, f"{p}.mlp.w13", f"{p}.mlp.w1.weight", f"{p}.mlp.w3.weight"),
                                      b.const("const.split_mlp", np.array([cfg.d_ff] * 2, np.int64))],
                            {"axis": -1}, outputs=2)
            act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
            m = self._linear(act, f"{p}.mlp.w2", f"{p}.mlp.w2.weight")
            h, resid = self._skip_norm(m, resid, self._next_norm(l))
        if k < cfg.num_stacks - 1:
            self._emit_memory(h)
        else:
            self._logits(h)
        return b.model()

    def _next_norm(self, l: int) -> str:
        if l + 1 < self.cfg.layers_per_stack:
            return f"{self.trunk}.{l + 1}.attn_norm.weight"
        return "norm_f.weight" if self.k == self.cfg.num_stacks - 1 else f"mem_norms.{self.k}.weight"

    def _cross(self, l: int, o, resid):
        """The cross-attention block of a consumer stack: returns (its output, new residual)."""
        b, c = self.b, f"crosses.{self.k - 1}.layers.{l}"
        h, resid = self._skip_norm(o, resid, f"{c}.norm.weight")
        q = self._linear(h, f"{c}.attn.wq", f"{c}.attn.wq.weight")
        a, *present = self._attention(q, b.values[f"cross_in.k.{l}"], b.values[f"cross_in.v.{l}"],
                                      b.values[f"cross.k.{l}"], b.values[f"cross.v.{l}"],
                                      self.cfg.cross_window)
        self._present(present, "cross", l)
        wo = self.w[f"{c}.attn.wo.weight"]
        if self.cfg.cross_gate:          # tanh(gate) * (a @ Wo) = a @ (tanh(gate) * Wo)
            gate = np.tanh(self.w[f"{c}.gate"].astype(np.float32))
            wo = (wo.astype(np.float32) * gate).astype(wo.dtype)
        return self.b.op("MatMul", [a, self.b.weight(f"{c}.attn.wo", _t(wo))]), resid

    def _emit_memory(self, h) -> None:
        """Consumer cross K/V of entries pos+1 .. pos+S (h is mem_norm of the output), and the
        null entry M[0] (weights only: computed here, broadcast to the batch)."""
        cfg, b, w = self.cfg, self.b, self.w
        c = f"crosses.{self.k}"
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        null_shape = b.op("Concat", [b.op("Shape", [b.values["pos"]]),
                                     b.const("const.null_shape", np.array([1, kv_dim], np.int64))],
                          {"axis": 0})                                       # [3] = B, 1, Hkv*D
        split = b.const("const.split_kv", np.array([kv_dim, kv_dim], np.int64))
        null = w[f"{c}.null"].astype(np.float32)
        for l in range(cfg.layers_per_stack):
            a = f"{c}.layers.{l}.attn"
            kk, vv = b.op("Split", [self._linear(h, f"{a}.wkv", f"{a}.wk.weight", f"{a}.wv.weight"), split],
                          {"axis": -1}, outputs=2)
            b.output(kk, f"cross_out.k.{l}")
            b.output(vv, f"cross_out.v.{l}")
            for kv, name in (("k", "wk"), ("v", "wv")):
                entry = (null @ _t(w[f"{a}.{name}.weight"]).astype(np.float32))[None, None]  # [1, 1, Hkv*D]
                b.output(b.op("Expand", [b.weight(f"{a}.null_{kv}", entry), null_shape]),
                         f"cross_null.{kv}.{l}")

    def _logits(self, h) -> None:
        """norm_f(x)[last position] @ head^T in fp32 -> [B, 1, V]."""
        b, w = self.b, self.w
        last = b.op("Slice", [h, b.const("const.minus_one", np.array([-1], np.int64)),
                              b.const("const.end", np.array([np.iinfo(np.int64).max], np.int64)),
                              self.one])                                     # [B, 1, d]
        head = w.get("lm_head.weight", w["embed.weight"])
        logits = b.op("MatMul", [last, b.weight("lm_head", _t(head))])
        if self.dtype != "float32":
            logits = b.op("Cast", [logits], {"to": b.ir.DataType.FLOAT})
        b.output(logits, "logits")
