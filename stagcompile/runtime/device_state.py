"""The decode state of one session on the device (HostState's layout, in CUDA buffers).

    DeviceState(cuda, ios, batch)
        rings[k]       self.* / cross.* [B, H, C, D] (zeroed by reset)
        staging[k]     new_self.* [B, H, 1, D], cross_null.* scratch, logits [B, 1, V]
        pending[k][p]  cross_in.* [B, H, 1, D] of consumer k for steps of parity p

At step i (parity p) stack k reads pending[k][p] and writes cross_out.* into pending[k+1][1-p];
after the step its new_self.* and pending[k][p] are committed into its rings at slot i mod C:
`commit` issues the copies from the host (slot computed here), `commit_tables` holds the same
commits for the device kernel that computes the slot on the GPU (CUDA graphs). Prefill chunks use
grow-only scratch buffers. Only numpy and `device.Cuda` are needed.
"""

from __future__ import annotations

from .device import ITEMSIZE, Copy2D, commit_table, nbytes, ring_commit_copies, seq_slice_copy
from .rings import role_map, shape_of


def cross_edges(ios: list[dict]) -> list[list[tuple[str, str, str]]]:
    """Per producer k: (cross_out name, cross_null name, consumer's cross_in name) by layer, k/v."""
    edges = []
    for k in range(len(ios) - 1):
        by: dict = {}
        for t in ios[k]["outputs"] + ios[k + 1]["inputs"]:
            by.setdefault((t["layer"], t["kv"]), {})[t["role"]] = t["name"]
        edges.append([(v["cross_out"], v["cross_null"], v["cross_in"])
                      for v in by.values() if "cross_out" in v])
    return edges


class DeviceState:
    """Device buffers of one (batch) session (see the module docstring)."""

    def __init__(self, cuda, ios: list[dict], batch: int):
        self.cuda, self.ios, self.batch = cuda, ios, batch
        self.edges = cross_edges(ios)
        self.owned: list[int] = []
        self.zero: list[tuple[int, int]] = []
        self.scratch_bufs: dict = {}
        # KV tensors [B, H, L, D] viewed as [rows = B*H, L, row = D elements]: (rows, row bytes)
        self.geom = [{t["name"]: (batch * t["shape"][1], t["shape"][3] * ITEMSIZE[t["dtype"]])
                      for t in io["inputs"] + io["outputs"] if len(t["shape"]) == 4}
                     for io in ios]
        self.caps = [{t["name"]: t["shape"][2] for t in io["inputs"]
                      if t["role"] in ("self", "cross")} for io in ios]
        self.rings = [{t["name"]: self._alloc(shape_of(t, batch, 0), t["dtype"], True)
                       for t in io["inputs"] if t["role"] in ("self", "cross")} for io in ios]
        self.staging = [{t["name"]: self._alloc(shape_of(t, batch, 1), t["dtype"])
                         for t in io["outputs"] if t["role"] != "cross_out"} for io in ios]
        self.pending = [[{t["name"]: self._alloc(shape_of(t, batch, 1), t["dtype"], True)
                          for t in io["inputs"] if t["role"] == "cross_in"} for _ in range(2)]
                        for io in ios]
        self.commits = [[self.ring_pairs(k, self.staging[k], self.pending[k][p]) for p in (0, 1)]
                        for k in range(len(ios))]
        self.tables_host = [[commit_table(c) for c in per_stack] for per_stack in self.commits]
        self.tables: list[list[int]] | None = None

    def _alloc(self, shape, dtype: str, zero: bool = False) -> int:
        size = nbytes(shape, dtype)
        ptr = self.cuda.malloc(size)
        self.owned.append(ptr)
        if zero:
            self.zero.append((ptr, size))
        return ptr

    def reset(self, stream) -> None:
        for ptr, size in self.zero:
            self.cuda.memset_async(ptr, size, stream)

    def inputs(self, k: int, parity: int) -> dict[str, int]:
        """Decode inputs of stack k but input_ids / pos (the backend's): rings, pending[k][p]."""
        return {**self.rings[k], **self.pending[k][parity]}

    def outputs(self, k: int, parity: int) -> dict[str, int]:
        out = dict(self.staging[k])
        if k < len(self.edges):
            nxt = self.pending[k + 1][1 - parity]
            out.update({src: nxt[dst] for src, _, dst in self.edges[k]})
        return out

    def ring_pairs(self, k: int, outputs: dict, inputs: dict) -> list[tuple]:
        """(ring, source, rows, capacity, row_bytes) of every ring stack k commits: new_self.*
        from `outputs` into self rings, cross_in.* from `inputs` into cross rings."""
        io, geom = self.ios[k], self.geom[k]
        pairs = [(outputs[src], dst) for src, dst in role_map(io, "new_self", "self")]
        pairs += [(inputs[src], dst) for src, dst in role_map(io, "cross_in", "cross", "inputs")]
        return [(self.rings[k][dst], src, geom[dst][0], self.caps[k][dst], geom[dst][1])
                for src, dst in pairs]

    def commit_tables(self, stream) -> list[list[int]]:
        """Device copies of the commit tables [k][parity] (int64 [N, 5]), uploaded once."""
        if self.tables is None:
            self.tables = [[self._alloc((t.size,), "int64") for t in per]
                           for per in self.tables_host]
            for per, ptrs in zip(self.tables_host, self.tables):
                for t, ptr in zip(per, ptrs):
                    self.cuda.copy(ptr, t.ctypes.data, t.nbytes, stream)
            self.cuda.sync(stream)
        return self.tables

    def commit(self, k: int, parity: int, pos: int, stream) -> None:
        for ring, src, rows, cap, row in self.commits[k][parity]:
            for c in ring_commit_copies(ring, src, rows, cap, 1, pos, row):
                self.cuda.copy2d(c, stream)

    # prefill
    def scratch(self, key, size: int) -> int:
        ptr, have = self.scratch_bufs.get(key, (0, 0))
        if have < size:
            if ptr:
                self.cuda.free(ptr)
                self.owned.remove(ptr)
            ptr, have = self.cuda.malloc(size), size
            self.owned.append(ptr)
            self.scratch_bufs[key] = (ptr, have)
        return ptr

    def prefill_buffers(self, k: int, seq: int, pos: int, produced: dict, stream) -> dict:
        """Scratch for stack k's outputs, and cross_in = M[pos .. pos+seq-1] assembled from the
        pending entry (the producer's null entry at pos 0) and the producer's first seq-1."""
        io, out = self.ios[k], {}
        for t in io["outputs"]:
            out[t["name"]] = self.scratch((k, t["name"]),
                                          nbytes(shape_of(t, self.batch, seq), t["dtype"]))
        for src, null, dst in (self.edges[k - 1] if k > 0 else []):
            rows, row = self.geom[k][dst]
            buf = out[dst] = self.scratch((k, dst), rows * seq * row)
            head = produced[null] if pos == 0 else self.pending[k][pos % 2][dst]
            self.cuda.copy2d(seq_slice_copy(buf, seq, 0, head, 1, 0, 1, rows, row), stream)
            if seq > 1:
                self.cuda.copy2d(seq_slice_copy(buf, seq, 1, produced[src], seq, 0, seq - 1,
                                                rows, row), stream)
        return out

    def prefill_commit(self, k: int, addr: dict, seq: int, pos: int, stream) -> list[Copy2D]:
        """Commit stack k's chunk into its rings; returns the hand-off copies of its last cross
        entries to pending[k+1][(pos+seq) % 2], to run once every stack has read pending."""
        for ring, src, rows, cap, row in self.ring_pairs(k, addr, addr):
            for c in ring_commit_copies(ring, src, rows, cap, seq, pos, row):
                self.cuda.copy2d(c, stream)
        if k >= len(self.edges):
            return []
        nxt = self.pending[k + 1][(pos + seq) % 2]
        return [seq_slice_copy(nxt[dst], 1, 0, addr[src], seq, seq - 1, 1, *self.geom[k][src])
                for src, _, dst in self.edges[k]]

    def free(self) -> None:
        for ptr in self.owned:
            self.cuda.free(ptr)
        self.owned, self.scratch_bufs = [], {}
