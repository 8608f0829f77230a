"""KV-cache rings and their commits, in numpy (copied into every bundle's runtime/).

Every stack owns self rings (`self.{k,v}.{l}` inputs of its graph); every consumer stack owns
cross rings (`cross.{k,v}.{l}`). They are allocated once per session at the manifest's capacities.
After a step, the entries of positions pos .. pos+S-1 are committed: a stack's `new_self.*`
outputs into its self rings, and a consumer's `cross_in.*` inputs into its cross rings, at slot
p mod C. A commit copies only the new entries (one slot per decode step), never the ring.
"""

from __future__ import annotations

import numpy as np

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def np_dtype(name: str):
    if name in NP_DTYPES:
        return NP_DTYPES[name]
    if name == "bfloat16":
        try:
            import ml_dtypes
            return ml_dtypes.bfloat16
        except ImportError:
            raise ValueError("bfloat16 buffers need the ml_dtypes package on the host") from None
    raise ValueError(f"unsupported tensor dtype {name!r}")


def shape_of(info: dict, batch: int, seq: int) -> tuple[int, ...]:
    sizes = {"batch": batch, "seq": seq}
    return tuple(sizes.get(d, d) for d in info["shape"])


def commit(ring: np.ndarray, new: np.ndarray, pos) -> None:
    """ring [B, H, C, D] <- new [B, H, S, D] for positions pos .. pos+S-1 (slot p mod C); a
    decode step (S = 1) may give every row its own position, pos [B]."""
    c, s = ring.shape[2], new.shape[2]
    if s == 1 and np.ndim(pos):
        ring[np.arange(len(pos)), :, pos % c] = new[:, :, 0]      # [B, H, D] at (row, slot)
        return
    if s == 1:
        ring[:, :, pos % c] = new[:, :, 0]
        return
    keep = min(c, s)
    first = pos + s - keep
    slots = (first + np.arange(keep)) % c
    ring[:, :, slots] = new[:, :, s - keep:]


def role_map(io: dict, src_role: str, dst_role: str, src_kind: str = "outputs") -> list[tuple[str, str]]:
    """Pairs (source name, ring name) matching by layer and k/v, e.g. new_self.k.0 -> self.k.0."""
    dst = {(t["layer"], t["kv"]): t["name"] for t in io["inputs"] if t["role"] == dst_role}
    return [(t["name"], dst[(t["layer"], t["kv"])]) for t in io[src_kind] if t["role"] == src_role]


class Rings:
    """All rings of one generation session (batch rows fixed at allocation)."""

    def __init__(self, ios: list[dict], batch: int):
        self.ios = ios
        self.batch = batch
        self.rings: list[dict[str, np.ndarray]] = []
        for io in ios:
            self.rings.append({t["name"]: np.zeros(shape_of(t, batch, 0), np_dtype(t["dtype"]))
                               for t in io["inputs"] if t["role"] in ("self", "cross")})
        self.self_pairs = [role_map(io, "new_self", "self") for io in ios]
        self.cross_pairs = [role_map(io, "cross_in", "cross", "inputs") for io in ios]

    def reset(self) -> None:
        for rings in self.rings:
            for r in rings.values():
                r.fill(0)

    def commit_stack(self, stack: int, outputs: dict, inputs: dict, pos,
                     rows: slice = slice(None)) -> None:
        """Commit 0-based `stack`'s new self entries and the cross entries it consumed (of
        `rows`, at `pos`: one position, or one per row)."""
        rings = {name: ring[rows] for name, ring in self.rings[stack].items()}
        for src, dst in self.self_pairs[stack]:
            commit(rings[dst], outputs[src], pos)
        for src, dst in self.cross_pairs[stack]:
            commit(rings[dst], inputs[src], pos)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for rings in self.rings for r in rings.values())
