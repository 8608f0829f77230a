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

Rows (in-flight batching): every buffer is batch-first, so rows 0 .. n-1 of each are one
contiguous view. `feeds(k, p, n)` / `fetches(k, p, n)` / `set_step(tokens[n], pos[n])` run a
decode step on the first n rows, each at its own position, with the parity p of a step counter
shared by all rows. A prefill chunk runs on one row's views (`rows=slice(r, r + 1)`) and leaves
the producers' last cross entries in `carry`, not in `pending`, so decode steps that run in
between (computing whatever an idle row holds) cannot overwrite them; `handoff(rows, p)` moves
them into `pending[.][p]` just before the row's first decode step.

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


def view(arrays: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """The same buffers restricted to `rows` (batch-first arrays: contiguous views)."""
    return {name: arr[rows] for name, arr in arrays.items()}


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
        self.carry = [_alloc([t for t in io["inputs"] if t["role"] == "cross_in"], batch)
                      for io in ios]
        # per producer: (cross_out name, cross_null name, consumer's cross_in name) by layer, k/v
        self.edges = []
        for k in range(self.num_stacks - 1):
            by = {}
            for t in ios[k]["outputs"] + ios[k + 1]["inputs"]:
                by.setdefault((t["layer"], t["kv"]), {})[t["role"]] = t["name"]
            self.edges.append([(v["cross_out"], v["cross_null"], v["cross_in"])
                               for v in by.values() if "cross_out" in v])

    def feeds(self, k: int, parity: int, n: int | None = None) -> dict[str, np.ndarray]:
        rows = slice(0, n)
        out = {"input_ids": self.tokens[rows], "pos": self.pos[rows]}
        out.update(view(self.rings.rings[k], rows))
        out.update(view(self.pending[k][parity], rows))
        return out

    def fetches(self, k: int, parity: int, n: int | None = None) -> dict[str, np.ndarray]:
        rows = slice(0, n)
        out = view(self.staging[k], rows)
        out.update(self.aliased(k, rows))
        if k < len(self.edges):
            nxt = self.pending[k + 1][1 - parity]
            out.update({src: nxt[dst][rows] for src, _, dst in self.edges[k]})
        return out

    def set_step(self, tokens: np.ndarray, pos) -> None:
        """Tokens [n] at positions `pos` (one for every row, or [n]) for a step on rows 0..n-1."""
        n = len(tokens)
        self.tokens[:n, 0] = tokens
        self.pos[:n] = pos
        self.step_pos = pos if np.ndim(pos) == 0 else self.pos[:n]

    def aliased(self, k: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Cache outputs of stack k bound to the cache arrays they update in place."""
        rings = self.rings.rings[k]
        return {t["name"]: rings[t["alias"]][rows] for t in self.ios[k]["outputs"]
                if t.get("alias")}

    def commit(self, k: int, parity: int, n: int | None = None) -> None:
        if not self.in_place[k]:
            rows = slice(0, n)
            self.rings.commit_stack(k, view(self.staging[k], rows),
                                    view(self.pending[k][parity], rows), self.step_pos, rows)

    def logits(self, n: int | None = None) -> np.ndarray:
        return self.staging[-1]["logits"][:n, -1]

    # ---- prefill -----------------------------------------------------------------------------
    def prefill_feeds(self, k: int, ids: np.ndarray, pos: int, produced: dict | None,
                      rows: slice = slice(None)) -> dict:
        """Inputs of stack k for a prompt chunk of `rows`: rings, and cross_in = M[pos .. pos+S-1],
        i.e. the carried entry (the producer's null entry at pos 0) then the producer's first
        S-1 entries."""
        feeds = {"input_ids": ids, "pos": np.full((ids.shape[0],), pos, np.int64)}
        feeds.update(view(self.rings.rings[k], rows))
        if k > 0:
            s, axis = ids.shape[1], self.axis[k]
            for src, null, dst in self.edges[k - 1]:
                head = produced[null] if pos == 0 else self.carry[k][dst][rows]
                first = np.take(produced[src], range(s - 1), axis=axis)
                feeds[dst] = np.concatenate([head, first], axis=axis)
        return feeds

    def prefill_commit(self, k: int, feeds: dict, outputs: dict, pos: int,
                       rows: slice = slice(None)) -> None:
        """Commit a prompt chunk of stack k and carry its last cross entries to the consumer."""
        if not self.in_place[k]:
            self.rings.commit_stack(k, outputs, feeds, pos, rows)
        if k < len(self.edges):
            s = feeds["input_ids"].shape[1]
            for src, _, dst in self.edges[k]:
                self.carry[k + 1][dst][rows] = np.take(outputs[src], [s - 1],
                                                       axis=self.axis[k + 1])

    def handoff(self, rows: slice, parity: int) -> None:
        """Give `rows`' carried cross entries to the decode step of `parity`."""
        for k in range(1, self.num_stacks):
            for name, arr in self.carry[k].items():
                self.pending[k][parity][name][rows] = arr[rows]
