"""The PyTorch reference StagFormer: the ground truth every fast path must match.

DESIGN.md section 1, exactly. Stacks are 0-indexed here (stack 0 is the paper's stack 1):

    stack 0:   x = E[t];  per layer: x += SelfAttn(norm(x)); x += MLP(norm(x))
    stack k>0: x = E[t];  per layer: x += SelfAttn(norm(x)); x += CrossAttn(norm(x), M(k)); x += MLP(norm(x))
               (with cfg.cross_gate: x += tanh(gate_{k,l}) * CrossAttn(norm(x), M(k)), gate zero at init)
    memory:    M(k)[0] = null_k,  M(k)[j] = mem_norm_{k-1}(x of stack k-1)[j - 1]
    logits:    norm_f(x of the last stack) @ E^T

Cross-attention is the same bounded-window op as self-attention, over the right-shifted memory:
query i attends M[j] for i - cross_window < j <= i, each entry rotated by RoPE at its index j.

Parameters (state-dict names): `embed.weight`; `trunks.{t}.layers.{l}.{attn_norm,attn.{wq,wk,wv,wo},
mlp_norm,mlp.{w1,w2,w3}}` with one trunk per stack, or a single trunk with shared_weights;
`crosses.{k-1}.layers.{l}.{norm,attn.*}` (and `.gate` [1] with cross_gate) and `crosses.{k-1}.null`
for consumer stack k; `mem_norms.{k}` for producer stack k; `norm_f.weight`; `lm_head.weight` only
when the config has tie_embeddings=false (imported Hugging Face models with a separate head).

Three ways to run it:
(a) `forward(ids, targets)`: teacher-forced, stacks in order over the whole sequence;
(b) `stagcompile.generate.naive_generate`: no cache, recomputes everything (ground truth);
(c) `stack_step`: one stack over S new positions with explicit caches, the function the exported
    graphs trace (DESIGN section 4): it returns new self K/V entries rather than writing caches,
    and a producer stack returns the consumer's cross K/V entries for positions pos+1 .. pos+S and
    the null entry M[0].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from plugins.reference import shared_masks
from stagcompile.config import StagConfig
from stagcompile.layers import CrossStack, RMSNorm, Trunk, rope_tables

KV = tuple[torch.Tensor, torch.Tensor]
INIT_DEPTHS = ("model", "stack")                 # reset_parameters' depth
DETACH = ("none", "keys", "values", "both")      # memory_entries' detach


@dataclass
class StackOutputs:
    new_self: list[KV]                    # per layer, [B, Hkv, S, D] each
    cross_out: Optional[list[KV]] = None  # per consumer layer: entries for positions pos+1..pos+S
    cross_null: Optional[list[KV]] = None  # per consumer layer: the null entry M[0], [B, Hkv, 1, D]
    logits: Optional[torch.Tensor] = None  # [B, S, V], fp32


class StagFormer(nn.Module):
    def __init__(self, cfg: StagConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.num_stacks
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.trunks = nn.ModuleList(Trunk(cfg) for _ in range(1 if cfg.shared_weights else p))
        self.crosses = nn.ModuleList(CrossStack(cfg) for _ in range(p - 1))
        self.mem_norms = nn.ModuleList(RMSNorm(cfg.d_model, cfg.norm_eps) for _ in range(p - 1))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings
                        else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None, depth: str = "model") -> None:
        """Normal(0, 0.02) weights, residual output projections (wo, w2) scaled by
        1/sqrt(2 * layers): the model's layers (`depth` "model", the default) or one stack's
        ("stack", since every stack starts its own residual stream from the embedding).
        Norms are one, cross gates zero."""
        if depth not in INIT_DEPTHS:
            raise ValueError(f"init depth {depth!r}: expected one of {', '.join(INIT_DEPTHS)}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        layers = self.cfg.num_layers if depth == "model" else self.cfg.layers_per_stack
        out_std = std / (2 * layers) ** 0.5
        for name, prm in self.named_parameters():
            if prm.is_meta:
                continue
            with torch.no_grad():
                if name.endswith("gate"):
                    prm.zero_()
                elif prm.dim() == 1 and not name.endswith("null"):
                    prm.fill_(1.0)
                else:
                    s = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                    prm.copy_(torch.randn(prm.shape, generator=gen) * s)

    # ---- structure -------------------------------------------------------------------------
    def trunk(self, k: int) -> Trunk:
        return self.trunks[0 if self.cfg.shared_weights else k]

    def stack_parameter_names(self) -> dict[int, list[str]]:
        """Which state-dict tensors each stack's computation uses (shared names repeat)."""
        names = list(dict(self.named_parameters()))
        out: dict[int, list[str]] = {}
        for k in range(self.cfg.num_stacks):
            t = 0 if self.cfg.shared_weights else k
            use = [n for n in names if n.startswith(f"trunks.{t}.") or n == "embed.weight"]
            if k > 0:
                use += [n for n in names if n.startswith(f"crosses.{k - 1}.")]
            if k < self.cfg.num_stacks - 1:
                use += [n for n in names if n.startswith((f"mem_norms.{k}.", f"crosses.{k}."))
                        and ("wk" in n or "wv" in n or n.endswith("null") or "mem_norms" in n)]
            else:
                use += ["norm_f.weight"] + ([] if self.cfg.tie_embeddings else ["lm_head.weight"])
            out[k] = sorted(set(use))
        return out

    # ---- shared pieces ---------------------------------------------------------------------
    def rope(self, positions: torch.Tensor):
        """RoPE tables for positions [B, S]."""
        return rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def _layer(self, k: int, l: int, x, tables, pos, self_kv, self_cache, cross_kv, cross_cache):
        """One layer of stack k; returns the new residual stream."""
        cfg = self.cfg
        sl = self.trunk(k).layers[l]
        h = sl.attn_norm(x)
        q = sl.attn.query(h, tables)
        x = x + sl.attn.attend(q, *self_kv(sl.attn, h), *self_cache, pos, cfg.self_window)
        if k > 0:
            cl = self.crosses[k - 1].layers[l]
            h = cl.norm(x)
            y = cl.attn.attend(cl.attn.query(h, tables), *cross_kv(cl.attn, l), *cross_cache,
                               pos, cfg.cross_window)
            x = x + (torch.tanh(cl.gate) * y if cfg.cross_gate else y)
        return x + sl.mlp(sl.mlp_norm(x))

    def memory_entries(self, x: torch.Tensor, producer: int, consumer: int, tables,
                       detach: str = "none") -> list[KV]:
        """Cross K/V of consumer stack `consumer` for memory entries mem_norm_producer(x)
        placed at the tables' positions (the producer's positions + 1).

        `detach` (training only; one of DETACH): "keys", "values" or "both" compute those from
        x.detach(), so no gradient reaches the producer stack through them (the memory norm and
        the projections still train); the values computed are the same."""
        norm = self.mem_norms[producer]
        h = norm(x)
        cut = norm(x.detach()) if detach != "none" else h
        hk = cut if detach in ("keys", "both") else h
        hv = cut if detach in ("values", "both") else h
        return [(cl.attn.key(hk, tables), cl.attn.value(hv))
                for cl in self.crosses[consumer - 1].layers]

    def null_entries(self, consumer: int, batch: int) -> list[KV]:
        """Cross K/V of the null slot M[0] of `consumer`, [batch, Hkv, 1, D] per layer.

        Projected for one row and then broadcast, so that in an exported graph everything up to
        the final Expand depends on weights only and is folded into constants (a decode step
        does not re-project the null slot)."""
        cs = self.crosses[consumer - 1]
        null = cs.null.to(self.embed.weight.dtype).view(1, 1, -1)              # [1, 1, d_model]
        zero = self.rope(torch.zeros(1, 1, dtype=torch.int64, device=null.device))
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))   # [B, Hkv, 1, D]
                for k, v in (cl.attn.key_value(null, zero) for cl in cs.layers)]

    def head_weight(self) -> torch.Tensor:
        """The LM head [V, d_model]: the embedding (tied) or `lm_head.weight`."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.norm_f(x).float(), self.head_weight().float().t())  # [B, S, V]

    # ---- (a) teacher-forced ----------------------------------------------------------------
    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                perturb: dict | None = None, stack_outputs: list | None = None,
                detach_memory: str = "none"):
        """Logits [B, T, V] (and the mean cross-entropy when `targets` is given).

        `perturb` {stack: tensor [B, T, d_model]} adds to a producer stack's output before it
        becomes memory; `stack_outputs`, when a list, receives every stack's output stream
        (both used by the staggering tests; the trainer's auxiliary loss reads the latter);
        `detach_memory` is `memory_entries`' `detach` (a training option)."""
        b, t = ids.shape
        tables = self.rope(torch.arange(t, device=ids.device).expand(b, t))    # over [B, T]
        pos0 = torch.zeros(b, dtype=torch.int64, device=ids.device)
        empty = self._empty_cache(b, ids.device)
        x0 = self.embed(ids)
        memory: list[KV] | None = None
        for k in range(self.cfg.num_stacks):
            x = x0
            for l in range(self.cfg.layers_per_stack):
                x = self._layer(k, l, x, tables, pos0, lambda a, h: a.key_value(h, tables),
                                empty, lambda a, l_: memory[l_], empty)
            if stack_outputs is not None:
                stack_outputs.append(x)
            if k < self.cfg.num_stacks - 1:
                if perturb and k in perturb:
                    x = x + perturb[k]
                memory = self.memory(x[:, :-1], k, k + 1, detach_memory)
        logits = self.logits(x)
        if targets is None:
            return logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def memory(self, stream: torch.Tensor, producer: int, consumer: int,
               detach: str = "none") -> list[KV]:
        """Memory M[0..n] of `consumer` as K/V: the null slot, then entries 1..n made from the
        producer's stream [B, n, d_model] (stream position j becomes entry j + 1)."""
        b, n = stream.shape[:2]
        shifted = torch.arange(1, n + 1, device=stream.device).expand(b, n)    # [B, n]
        entries = self.memory_entries(stream, producer, consumer, self.rope(shifted), detach)
        nulls = self.null_entries(consumer, b)
        return [(torch.cat([nk, k], 2), torch.cat([nv, v], 2))
                for (nk, nv), (k, v) in zip(nulls, entries)]

    def _empty_cache(self, b: int, device) -> KV:
        cfg = self.cfg
        z = torch.zeros(b, cfg.n_kv_heads, 0, cfg.head_dim, device=device,
                        dtype=self.embed.weight.dtype)
        return z, z

    # ---- (c) one stack over explicit caches ------------------------------------------------
    def stack_step(self, k: int, ids: torch.Tensor, pos: torch.Tensor, self_cache: list[KV],
                   cross_cache: list[KV] | None = None, cross_in: list[KV] | None = None,
                   emit_for: int | None = None, with_null: bool = True) -> StackOutputs:
        """Run stack k on tokens `ids` [B, S] at positions pos .. pos+S-1 (pos [B]).

        self_cache: per layer (K, V) rings [B, Hkv, C_self, D] holding positions < pos.
        cross_cache / cross_in (stack k > 0): per layer rings of M entries < pos and the new
        entries M[pos .. pos+S-1] [B, Hkv, S, D].
        emit_for: the consumer whose cross entries this stack produces (default k + 1 when a
        next stack exists; 1 for recurrent decoding of a shared-weight P = 2 model).
        with_null: also return the consumer's null entry M[0] (a graph always emits it; a cached
        decode step, which never reads it, skips it)."""
        cfg = self.cfg
        b, s = ids.shape
        positions = pos[:, None] + torch.arange(s, device=ids.device)[None, :]    # [B, S]
        tables = self.rope(positions)
        new_self: list[KV] = []

        def self_kv(attn, h):
            kv = attn.key_value(h, tables)
            new_self.append(kv)
            return kv

        x = self.embed(ids)
        with shared_masks():
            for l in range(cfg.layers_per_stack):
                x = self._layer(k, l, x, tables, pos, self_kv, self_cache[l],
                                lambda a, l_: cross_in[l_], cross_cache[l] if k > 0 else None)
        out = StackOutputs(new_self=new_self)
        if emit_for is None and k < cfg.num_stacks - 1:
            emit_for = k + 1
        if emit_for is not None:
            producer = emit_for - 1
            out.cross_out = self.memory_entries(x, producer, emit_for, self.rope(positions + 1))
            out.cross_null = self.null_entries(emit_for, b) if with_null else None
        if k == cfg.num_stacks - 1:
            out.logits = self.logits(x)
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
