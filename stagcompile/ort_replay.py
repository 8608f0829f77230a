"""The golden trace seen through the ort flavour's layout (numpy only, no torch).

The trace (stagcompile.golden) is recorded in the ring layout of the portable/plugin graphs:
rotated keys [B, H, S, D], entries committed by the runtime. The ort graphs differ in four ways,
and this module translates each one, so that every traced step is checked from golden state:

    trace                                   ort graph
    cross_in.* rotated [B, H, S, D]         cross_in.* unrotated [B, S, H*D] (inverse rotation)
    ring caches, slot p mod C               self.* / cross.*: row p (unbounded), or the latest
                                            positions from row 0 (GroupQueryAttention's
                                            sliding-window cache, `resident_rows`)
    new_self.* (outputs)                    the new rows of present.self.* (written in place)
    cross_out.* rotated at pos+1            cross_out.* unrotated [B, S, H*D] (rotated here)
    cross_null.*, logits [B, S, V]          cross_null.* [B, 1, H*D], logits of the last position

`OrtReplay.steps()` yields the graph's feeds and the golden outputs it must reproduce;
`OrtReplay.to_golden()` turns a graph's outputs into those golden names and layouts (the new
cross rows appended to present.cross.* are checked against the entries fed, as `cross_in.*`).
"""

from __future__ import annotations

import numpy as np

from stagcompile.replay import Trace, TraceStep
from stagcompile.runtime.bundle import Bundle
from stagcompile.runtime.rings import np_dtype


def resident_rows(total: int, capacity: int, window: int | None) -> int:
    """Rows of a GroupQueryAttention cache holding positions total-L .. total-1 after `total`
    tokens (its documented eviction rule; every row up to `total` when unbounded)."""
    if window is None or total <= capacity:
        return total
    reclaim = capacity - window + 1
    return total - reclaim * -(-(total - capacity) // reclaim)


def rotate(x: np.ndarray, positions: np.ndarray, theta: float, sign: float = 1.0) -> np.ndarray:
    """Rotate-half RoPE of x [B, H, S, D] at positions [B, S] (sign -1 undoes it), in fp32 with
    the reference's angles (fp32 position x fp32 inverse frequency)."""
    d = x.shape[-1]
    inv_freq = np.float32(theta) ** (-np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    angles = positions.astype(np.float32)[:, None, :, None] * inv_freq          # [B, 1, S, D/2]
    cos, sin = np.cos(angles), np.sin(angles) * np.float32(sign)
    xf = x.astype(np.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def packed(x: np.ndarray) -> np.ndarray:
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, s, h * d))


def heads(x: np.ndarray, h: int) -> np.ndarray:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, hd = x.shape
    return x.reshape(b, s, h, hd // h).transpose(0, 2, 1, 3)


class OrtReplay:
    def __init__(self, bundle: Bundle, trace: Trace):
        self.bundle, self.trace = bundle, trace
        cfg = bundle.config
        self.heads, self.theta = cfg["n_kv_heads"], cfg["rope_theta"]
        self.windows = {"self": cfg["self_window"], "cross": cfg["cross_window"]}
        self.ios = [bundle.io(k + 1, "ort") for k in range(bundle.num_stacks)]

    def _positions(self, pos: np.ndarray, s: int, offset: int = 0) -> np.ndarray:
        return pos[:, None] + offset + np.arange(s)[None, :]                   # [B, S]

    def _cache(self, info: dict, history: np.ndarray, total: int) -> np.ndarray:
        """The cache input `info` after `total` tokens whose entries are history[..., :total, :]."""
        shape = (history.shape[0], *info["shape"][1:])
        cache = np.zeros(shape, np.float32)
        rows = resident_rows(total, shape[2], self.windows[info["role"]])
        cache[:, :, :rows] = history[:, :, total - rows:total]
        return cache

    def steps(self, dtype: str | None = None):
        """Yield TraceStep (feeds in the ort layout, golden outputs) for every (step, stack)."""
        cast = np_dtype(dtype) if dtype else None
        history: list[dict] = [{} for _ in self.ios]     # per stack: cache name -> entries so far
        for rec in self.trace.steps():
            k = rec.stack - 1
            pos = rec.feeds["pos"]
            s = rec.feeds["input_ids"].shape[1]
            total = int(pos[0])
            feeds = {"input_ids": rec.feeds["input_ids"], "pos": pos}
            new = {}
            for t in self.ios[k]["inputs"]:
                name, role = t["name"], t["role"]
                if role == "cross_in":
                    entries = rec.feeds[name]
                    if t["kv"] == "k":
                        entries = rotate(entries, self._positions(pos, s), self.theta, -1.0)
                    feeds[name] = packed(entries)
                    new[f"cross.{t['kv']}.{t['layer']}"] = rec.feeds[name]
                elif role in ("self", "cross"):
                    hist = history[k].get(name)
                    feeds[name] = (self._cache(t, hist, total) if hist is not None
                                   else np.zeros((pos.shape[0], *t["shape"][1:]), np.float32))
                    if role == "self":
                        new[name] = rec.golden[f"new_self.{t['kv']}.{t['layer']}"]
            for name, entries in new.items():
                old = history[k].get(name)
                history[k][name] = entries if old is None else np.concatenate([old, entries], 2)
            if cast is not None:
                feeds = {n: a.astype(cast) if a.dtype.kind == "f" else a for n, a in feeds.items()}
            golden = dict(rec.golden)
            if "logits" in golden:
                golden["logits"] = golden["logits"][:, -1:]
            golden.update({n: rec.feeds[n] for n in rec.feeds if n.startswith("cross_in.")})
            for t in self.ios[k]["outputs"]:        # new entries still resident after the step
                if t["role"] in ("present_self", "present_cross"):
                    name = self._entry_name(t)
                    golden[name] = golden[name][:, :, s - self._kept(t, total, s):]
            yield TraceStep(rec.step, rec.stack, feeds, golden)

    def _entry_name(self, info: dict) -> str:
        prefix = "new_self" if info["role"] == "present_self" else "cross_in"
        return f"{prefix}.{info['kv']}.{info['layer']}"

    def _rows(self, info: dict, total: int) -> int:
        return resident_rows(total, info["shape"][2], self.windows[info["role"].split("_")[1]])

    def _kept(self, info: dict, pos: int, s: int) -> int:
        """How many of the S new entries of a present.* output are still in the cache."""
        return min(s, self._rows(info, pos + s))

    def to_golden(self, stack: int, feeds: dict, outputs: dict) -> dict:
        """A graph's outputs for `feeds`, in the golden names and layout (see module docstring)."""
        pos = feeds["pos"]
        s = feeds["input_ids"].shape[1]
        out = {}
        for t in self.ios[stack - 1]["outputs"]:
            name, role, value = t["name"], t["role"], outputs[t["name"]]
            if role in ("present_self", "present_cross"):
                rows = self._rows(t, int(pos[0]) + s)
                kept = self._kept(t, int(pos[0]), s)
                out[self._entry_name(t)] = value[:, :, rows - kept:rows]          # [B, H, n, D]
            elif role == "cross_out" and t["kv"] == "k":
                out[name] = rotate(heads(value, self.heads), self._positions(pos, s, 1), self.theta)
            elif role in ("cross_out", "cross_null"):
                out[name] = heads(value, self.heads)
            else:
                out[name] = value
        return out
