"""Static cost model of a StagFormer, for `stagcompile inspect` (no torch needed).

Per stack and per decode step (batch 1, one token): parameters owned and used, matmul FLOPs,
weight bytes read, attention FLOPs at a given context, and KV-cache bytes. The ideal staggered
speedup is the sequential step's cost (all stacks one after another) over the slowest stack's
cost: what running the stacks concurrently can gain at best.

Work assignment follows DESIGN.md section 4: a producer stack computes the consumer's cross K/V
projections; the consumer does the cross Q/O projections and the cross attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stagcompile.config import StagConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class StackCost:
    stack: int
    params_owned: int          # parameters stored for this stack (shared ones counted on stack 1)
    params_used: int           # parameters this stack's decode step reads
    matmul_flops: int          # per token
    attention_flops: int       # per token at the given context
    weight_bytes: int          # per token
    self_kv_bytes_per_token: int
    cross_kv_bytes_per_token: int
    self_kv_bytes: int         # allocated at capacity
    cross_kv_bytes: int

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.attention_flops


def _attn_params(cfg: StagConfig) -> dict[str, int]:
    d, hd = cfg.d_model, cfg.head_dim
    return {"q": d * cfg.n_heads * hd, "k": d * cfg.n_kv_heads * hd,
            "v": d * cfg.n_kv_heads * hd, "o": cfg.n_heads * hd * d}


def stack_costs(cfg: StagConfig, dtype: str = "float32", context: int | None = None) -> list[StackCost]:
    context = cfg.max_seq_len if context is None else context
    nbytes = DTYPE_BYTES[dtype]
    d, L, P = cfg.d_model, cfg.layers_per_stack, cfg.num_stacks
    a = _attn_params(cfg)
    attn = sum(a.values())
    mlp = 3 * d * cfg.d_ff
    layer_self = attn + mlp + 2 * d                     # + attention and MLP norms
    cross_owned = attn + d                              # + cross norm, per layer
    kv_entry = 2 * cfg.n_kv_heads * cfg.head_dim * nbytes
    self_ctx = min(context, cfg.self_window or context)
    cross_ctx = min(context, cfg.cross_window or context)
    out = []
    for k in range(P):
        owned = used = L * layer_self
        norms = 2 * L * d
        if cfg.shared_weights and k > 0:
            owned = 0
        if k > 0:                                        # cross Q/O/norm + null, owned here
            owned += L * cross_owned + d
            used += L * (a["q"] + a["o"] + d)
            norms += L * d
        if k < P - 1:                                    # memory norm + consumer's cross K/V
            owned += d
            used += d + L * (a["k"] + a["v"])
            norms += d
        if k == 0:
            owned += cfg.vocab_size * d                  # tied embedding
        if k == P - 1:
            owned += d                                   # final norm
            used += d + cfg.vocab_size * d               # logits read the whole embedding
            norms += d
        mm = 2 * (used - norms)
        att = L * 2 * 2 * cfg.n_heads * cfg.head_dim * self_ctx
        if k > 0:
            att += L * 2 * 2 * cfg.n_heads * cfg.head_dim * cross_ctx
        out.append(StackCost(
            stack=k + 1, params_owned=owned, params_used=used, matmul_flops=mm,
            attention_flops=att, weight_bytes=used * nbytes,
            self_kv_bytes_per_token=L * kv_entry,
            cross_kv_bytes_per_token=L * kv_entry if k > 0 else 0,
            self_kv_bytes=L * kv_entry * cfg.self_capacity(),
            cross_kv_bytes=L * kv_entry * cfg.cross_capacity() if k > 0 else 0))
    return out


def report(cfg: StagConfig, dtype: str = "float32", context: int | None = None) -> dict:
    costs = stack_costs(cfg, dtype, context)
    total_flops = sum(c.flops for c in costs)
    slowest = max(c.flops for c in costs)
    return {
        "config": cfg.to_dict(),
        "dtype": dtype,
        "context": cfg.max_seq_len if context is None else context,
        "parameters": sum(c.params_owned for c in costs),
        "shared": ("every stack reuses stack 1's self-attention, MLP and norm weights; "
                   "cross-attention, null slot and memory norm are per stack")
        if cfg.shared_weights else None,
        "stacks": [asdict(c) | {"flops": c.flops} for c in costs],
        "kv_bytes_per_token": sum(c.self_kv_bytes_per_token + c.cross_kv_bytes_per_token
                                  for c in costs),
        "kv_bytes_at_capacity": sum(c.self_kv_bytes + c.cross_kv_bytes for c in costs),
        "ideal_staggered_speedup": total_flops / slowest,
    }
