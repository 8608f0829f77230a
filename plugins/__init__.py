"""BoundedWindowAttention: the one attention operation of a StagFormer, specified once.

    out = BoundedWindowAttention(q, k_new, v_new, k_cache, v_cache, pos; window, scale)

Inputs (B batch rows, Hq query heads, Hkv key/value heads, S new positions, C ring slots, D head dim)

    q        [B, Hq,  S, D]   queries for absolute positions pos[b] .. pos[b] + S - 1
    k_new    [B, Hkv, S, D]   keys of the S new entries (the same positions as the queries)
    v_new    [B, Hkv, S, D]   values of the S new entries
    k_cache  [B, Hkv, C, D]   ring buffer of earlier keys: position p lives in slot p mod C
    v_cache  [B, Hkv, C, D]   ring buffer of earlier values, same layout
    pos      [B] int64        absolute position of each row's first new entry (rows may differ)

Attributes

    window   int >= 0         0 = unbounded; otherwise the query at position p attends exactly the
                              entries at positions p' with p - window < p' <= p
    scale    float > 0        multiplies q.k before the softmax (usually 1/sqrt(D))

Output

    out      [B, Hq, S, D]    same dtype as q

Semantics. For row b and new index s, the query position is p = pos[b] + s. It attends every entry
p' with max(0, p - window + 1) <= p' <= p (lower bound 0 when window = 0). An entry with
p' >= pos[b] is new entry p' - pos[b] (so prefill, S > 1, is causal within the new block); an entry
with p' < pos[b] is read from ring slot p' mod C. The query's own entry is always inside the
window, so no row is ever empty. Softmax and accumulation are done in fp32 for every input dtype
(fp32, fp16, bf16; all float inputs share one dtype; pos is int64, int32 is accepted).

Grouped-query attention: query head h reads key/value head h // (Hq / Hkv); Hq must be a
multiple of Hkv.

The cache. The op never writes it: new entries are outputs of the surrounding graph, and the
runtime commits them into the ring after the step. When pos[b] = 0 the cache holds nothing valid
and is not read at all (its contents may be anything, NaN included). Requirements on C: with a
bounded window the ring must hold the window's older part, C >= window - 1 (stagcompile uses
C = window); with window = 0 every earlier position must still be in the ring, pos[b] <= C. A
slot outside the window is never read by the Triton kernel (tests poison those slots with NaN).

Four implementations must agree with each other (see the README's table):

1. `plugins.reference`  torch, the definition; used by `stagcompile.model`,
2. `plugins.triton_kernel` the GPU kernel (runs on CPU under TRITON_INTERPRET=1), compiled ahead
   of time to PTX by `plugins.aot`,
3. `plugins.trt_plugin` the TensorRT plugin (`tensorrt.plugin`, namespace `stagformer`),
4. `plugins.ort_kernel` an onnxruntime-extensions kernel for the same ONNX node, on CPU.

The portable expression (standard ONNX operators, mask built from pos) is the reference itself,
exported by torch.onnx (`plugins.onnx_node.export_portable_op`). Shape, dtype and launch-grid logic
that every implementation shares lives in `plugins.spec` as plain functions.
"""

OP_NAME = "BoundedWindowAttention"
NAMESPACE = "stagformer"
