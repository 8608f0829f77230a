"""Host-memory decode state of one session: rings, step inputs, staging and pending buffers.

Everything a decode step touches is allocated here once per (batch) session:

    tokens [B, 1] int64, pos [B] int64          written before a step, read by every stack
    rings (stagcompile.runtime.rings.Rings)    self rings per stack, cross rings per consumer
    staging[k]   new_self.* [B, H, 1, D], logits [B, 1, V], cross_null.* scratch
    pending[k][p] cross_in.* [B, H, 1, D] of consumer k for steps of parity p

At step i (parity p = i % 2) consumer k reads pending[k][p] (entry M[i], produced at step i-1),
while its producer writes cross_out.* straight into pending[k][1 - p] (entry M[i+1]): no graph
writes memory that a concurrently running graph reads, and no copy moves entries between stacks.
After its run, stack k commits its own new_self.* and pending[k][p] into its rings (one slot).
`feeds(k, p)` / `fetches(k, p)` give the name -> array maps a backend binds once.

Graphs that update their caches in place (the ort flavour: each cache input has an output whose
`alias` names it) get the same buffers, except that the cache outputs are bound to the cache
arrays themselves and there is nothing to commit: `commit` only applies to ring graphs. Their
cross entries are [B, S, H*D] instead of [B, H, S, D]: the sequence axis is read off the table.
"""

from __future__ import annotations

import numpy as np

from .rings import Rings, np_dtype, shape_of


def _alloc(infos, batch: int) -> dict[str, np.ndarray]:
    return {t["name"]: np.zeros(shape_of(t, batch, 1), np_dtype(t["dtype"])) for t in infos}


def in_place(io: dict) -> bool:
    """True for a graph that appends to its caches itself (outputs with an `alias`)."""
    return any(t.get("alias") for t in io["outputs"])


def seq_axis(io: dict, role: str = "cross_in") -> int:
    """The axis of the new positions in `role` tensors (2 in [B, H, S, D], 1 in [B, S, H*D])."""
    shape = next((t["shape"] for t in io["inputs"] + io["outputs"] if t["role"] == role), None)
    return shape.index("seq") if shape and "seq" in shape else 2


class HostState:
    def __init__(self, ios: list[dict], batch: int):
        self.ios, self.batch = ios, batch
        self.num_stacks = len(ios)
        self.rings = Rings(ios, batch)
        self.in_place = [in_place(io) for io in ios]
        self.axis = [seq_axis(io) for io in ios]
        self.tokens = np.zeros((batch, 1), np.int64)
        self.pos = np.zeros((batch,), np.int64)
        self.step_pos = 0
        self.staging = [_alloc([t for t in io["outputs"]
                                if t["role"] != "cross_out" and not t.get("alias")], batch)
                        for io in ios]
        self.pending = [[_alloc([t for t in io["inputs"] if t["role"] == "cross_in"], batch)
                         for _ in range(2)] for io in ios]
        # per producer: (cross_out name, cross_null name, consumer's cross_in name) by layer, k/v
        self.edges = []
        for k in range(self.num_stacks - 1):
            by = {}
            for t in ios[k]["outputs"] + ios[k + 1]["inputs"]:
                by.setdefault((t["layer"], t["kv"]), {})[t["role"]] = t["name"]
            self.edges.append([(v["cross_out"], v["cross_null"], v["cross_in"])
                               for v in by.values() if "cross_out" in v])

    def feeds(self, k: int, parity: int) -> dict[str, np.ndarray]:
        out = {"input_ids": self.tokens, "pos": self.pos}
        out.update(self.rings.rings[k])
        out.update(self.pending[k][parity])
        return out

    def fetches(self, k: int, parity: int) -> dict[str, np.ndarray]:
        out = dict(self.staging[k])
        out.update(self.aliased(k))
        if k < len(self.edges):
            nxt = self.pending[k + 1][1 - parity]
            out.update({src: nxt[dst] for src, _, dst in self.edges[k]})
        return out

    def set_step(self, tokens: np.ndarray, pos: int) -> None:
        self.tokens[:, 0] = tokens
        self.pos.fill(pos)
        self.step_pos = pos

    def aliased(self, k: int) -> dict[str, np.ndarray]:
        """Cache outputs of stack k bound to the cache arrays they update in place."""
        rings = self.rings.rings[k]
        return {t["name"]: rings[t["alias"]] for t in self.ios[k]["outputs"] if t.get("alias")}

    def commit(self, k: int, parity: int) -> None:
        if not self.in_place[k]:
            self.rings.commit_stack(k, self.staging[k], self.pending[k][parity], self.step_pos)

    @property
    def logits(self) -> np.ndarray:
        return self.staging[-1]["logits"][:, -1]

    # ---- prefill -----------------------------------------------------------------------------
    def prefill_feeds(self, k: int, ids: np.ndarray, pos: int, produced: dict | None) -> dict:
        """Inputs of stack k for a prompt chunk: rings, and cross_in = M[pos .. pos+S-1], i.e. the
        pending entry (the producer's null entry at pos 0) then the producer's first S-1 entries."""
        feeds = {"input_ids": ids, "pos": np.full((ids.shape[0],), pos, np.int64)}
        feeds.update(self.rings.rings[k])
        if k > 0:
            s, axis = ids.shape[1], self.axis[k]
            for src, null, dst in self.edges[k - 1]:
                head = produced[null] if pos == 0 else self.pending[k][pos % 2][dst]
                first = np.take(produced[src], range(s - 1), axis=axis)
                feeds[dst] = np.concatenate([head, first], axis=axis)
        return feeds

    def prefill_commit(self, k: int, feeds: dict, outputs: dict, pos: int) -> None:
        """Commit a prompt chunk of stack k and hand its last cross entries to the consumer."""
        if not self.in_place[k]:
            self.rings.commit_stack(k, outputs, feeds, pos)
        if k < len(self.edges):
            s = feeds["input_ids"].shape[1]
            nxt = self.pending[k + 1][(pos + s) % 2]
            for src, _, dst in self.edges[k]:
                nxt[dst][...] = np.take(outputs[src], [s - 1], axis=self.axis[k + 1])
