"""Generation with the reference model: the naive ground truth and the cached path.

`naive_generate` recomputes the teacher-forced forward over the whole sequence for every token
(no cache): it is the definition of greedy decoding that every fast path must reproduce.

`CachedDecoder` follows DESIGN.md section 4 with explicit, preallocated ring caches:

    prefill(ids [B, T])   stacks one after another on the prompt
    step(tokens [B])      one decode step; every stack reads only what earlier steps committed,
                          so the stacks could run concurrently (the runtime does)

Per consumer stack it keeps a `pending` entry M[i] (produced by the producer at step i-1) that
becomes the consumer's cross input at step i, and is committed into the consumer's cross ring
after the step. With `recurrent=True` (shared weights, P = 2) prefill runs both passes and each
decode step runs only pass 2, whose own output at position i becomes memory entry i+1.
"""

from __future__ import annotations

import torch

from stagcompile.model import KV, StagFormer


def ring_commit(ring: torch.Tensor, new: torch.Tensor, pos: torch.Tensor) -> None:
    """Write entries for positions pos .. pos+S-1 (new [B, H, S, D]) into ring slots p mod C."""
    c, s = ring.shape[2], new.shape[2]
    keep = min(c, s)
    for b in range(ring.shape[0]):
        first = int(pos[b]) + s - keep
        slots = torch.arange(first, first + keep) % c
        ring[b, :, slots] = new[b, :, s - keep:].to(ring.dtype)


class CachedDecoder:
    """Explicit caches for one generation session of `batch` rows."""

    null_at_decode = False      # only position 0 reads the null slot: decode steps skip it

    def __init__(self, model: StagFormer, batch: int, recurrent: bool = False):
        cfg = model.cfg
        if recurrent and not (cfg.shared_weights and cfg.num_stacks == 2):
            raise ValueError("recurrent decoding needs shared_weights=true and num_stacks=2, "
                             f"got shared_weights={cfg.shared_weights}, num_stacks={cfg.num_stacks}")
        self.model, self.cfg, self.recurrent = model, cfg, recurrent
        dt = model.embed.weight.dtype

        def rings(cap: int) -> list[KV]:
            shape = (batch, cfg.n_kv_heads, cap, cfg.head_dim)
            return [(torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt))
                    for _ in range(cfg.layers_per_stack)]

        self.self_cache = [rings(cfg.self_capacity()) for _ in range(cfg.num_stacks)]
        self.cross_cache = [None] + [rings(cfg.cross_capacity()) for _ in range(cfg.num_stacks - 1)]
        self.pending: list[list[KV] | None] = [None] * cfg.num_stacks
        self.pos = torch.zeros(batch, dtype=torch.int64)

    def run_stack(self, k: int, ids, pos, cross_in, emit_for=None, with_null=True):
        """One stack over the committed caches (the golden-trace recorder hooks here)."""
        return self.model.stack_step(k, ids, pos, self.self_cache[k], self.cross_cache[k],
                                     cross_in, emit_for=emit_for, with_null=with_null)

    def _commit(self, k: int, out, cross_in, pos: torch.Tensor) -> None:
        for ring, new in zip(self.self_cache[k], out.new_self):
            ring_commit(ring[0], new[0], pos)
            ring_commit(ring[1], new[1], pos)
        if cross_in is not None:
            for ring, new in zip(self.cross_cache[k], cross_in):
                ring_commit(ring[0], new[0], pos)
                ring_commit(ring[1], new[1], pos)

    def _cross_input(self, consumer: int, produced, nulls, s: int) -> list[KV]:
        """M[pos .. pos+S-1]: the pending entry (or the null slot at pos 0), then the first
        S-1 entries the producer just made; the last one becomes pending."""
        head = self.pending[consumer] if self.pending[consumer] is not None else nulls
        ins = [(torch.cat([hk, k[:, :, : s - 1]], 2), torch.cat([hv, v[:, :, : s - 1]], 2))
               for (hk, hv), (k, v) in zip(head, produced)]
        self.pending[consumer] = [(k[:, :, s - 1:], v[:, :, s - 1:]) for k, v in produced]
        return ins

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T]; return the logits [B, T, V]."""
        self._check_room(ids.shape[1])
        s, pos = ids.shape[1], self.pos
        produced = None
        for k in range(self.cfg.num_stacks):
            cross_in = None
            if k > 0:
                cross_in = self._cross_input(k, produced.cross_out, produced.cross_null, s)
            out = self.run_stack(k, ids, pos, cross_in)
            self._commit(k, out, cross_in, pos)
            produced = out
        self.pos = pos + s
        return out.logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for tokens [B]; returns logits [B, V]."""
        self._check_room(1)
        ids, pos = tokens[:, None], self.pos
        stacks = [1] if self.recurrent else range(self.cfg.num_stacks)
        outs, ins = {}, {}
        for k in stacks:           # every stack reads only committed state: order is irrelevant
            ins[k] = self.pending[k] if k > 0 else None
            outs[k] = self.run_stack(k, ids, pos, ins[k], emit_for=1 if self.recurrent else None,
                                     with_null=self.null_at_decode)
        for k in stacks:
            self._commit(k, outs[k], ins[k], pos)
            if outs[k].cross_out is not None:
                consumer = 1 if self.recurrent else k + 1
                self.pending[consumer] = outs[k].cross_out
        self.pos = pos + 1
        return outs[self.cfg.num_stacks - 1].logits[:, -1]

    def _check_room(self, s: int) -> None:
        end = int(self.pos.max()) + s
        if not self.cfg.unbounded_length and end > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len={self.cfg.max_seq_len} "
                             "of a model with unbounded attention")


@torch.no_grad()
def cached_generate(model: StagFormer, ids: torch.Tensor, max_new_tokens: int,
                    recurrent: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens [B, n] and the logits [B, V] that chose each, through the cached path."""
    dec = CachedDecoder(model, ids.shape[0], recurrent)
    logits = dec.prefill(ids)[:, -1]
    tokens, all_logits = [], []
    for i in range(max_new_tokens):
        all_logits.append(logits)
        tok = logits.argmax(-1)
        tokens.append(tok)
        if i + 1 < max_new_tokens:
            logits = dec.step(tok)
    return torch.stack(tokens, 1), all_logits


@torch.no_grad()
def naive_generate(model: StagFormer, ids: torch.Tensor,
                   max_new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with no cache: the full forward over the whole sequence per token."""
    seq = ids
    tokens, all_logits = [], []
    for _ in range(max_new_tokens):
        logits = model(seq)[:, -1]
        all_logits.append(logits)
        tok = logits.argmax(-1)
        tokens.append(tok)
        seq = torch.cat([seq, tok[:, None]], 1)
    return torch.stack(tokens, 1), all_logits


@torch.no_grad()
def recurrent_reference_logits(model: StagFormer, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits [B, T, V] of recurrent decoding, recomputed from scratch with no cache.

    Memory entries 1..prompt_len come from pass 1 over the prompt; every later entry j is
    mem_norm(pass-2 output at j-1). Each position i >= prompt_len reruns pass 2 over the whole
    prefix with the memory known so far (cubic cost: a test oracle, not a decoder)."""
    b, t = ids.shape
    m = model
    pos0 = torch.zeros(b, dtype=torch.int64)
    empty = m._empty_cache(b, ids.device)

    def run(k: int, n: int, memory=None) -> torch.Tensor:
        tables = m.rope(torch.arange(n).expand(b, n))                           # over [B, n]
        x = m.embed(ids[:, :n])
        for l in range(m.cfg.layers_per_stack):
            x = m._layer(k, l, x, tables, pos0, lambda a, h: a.key_value(h, tables), empty,
                         lambda a, l_: memory[l_], empty)
        return x

    stream = run(0, prompt_len)                  # pass 1 over the prompt: entries 1..prompt_len
    logits = torch.zeros(b, t, m.cfg.vocab_size)
    for i in range(prompt_len - 1, t):
        x = run(1, i + 1, m.memory(stream[:, :i], 0, 1))
        if i == prompt_len - 1:
            logits[:, : i + 1] = m.logits(x)
        else:
            logits[:, i] = m.logits(x[:, -1:])[:, 0]
            stream = torch.cat([stream, x[:, -1:]], 1)   # pass-2 output at i is entry i + 1
    return logits
