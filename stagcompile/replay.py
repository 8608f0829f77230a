"""Replay a golden trace as complete graph inputs, in numpy (no torch).

For each recorded step and stack this yields the feed dict of that stack's graph (the trace's
`input_ids`, `pos` and `cross_in.*`, plus every cache input rebuilt by committing earlier steps'
golden `new_self.*` and `cross_in.*` into rings exactly as the runtime does) and the golden
outputs. Every step is therefore checked from golden state: an error in one step cannot leak
into the next.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stagcompile.errors import StagError
from stagcompile.runtime.bundle import Bundle
from stagcompile.runtime.rings import Rings, np_dtype


@dataclass
class TraceStep:
    step: int           # 0 = prefill
    stack: int          # 1-based
    feeds: dict
    golden: dict


class Trace:
    def __init__(self, bundle: Bundle):
        meta = bundle.manifest.get("validation")
        if not meta:
            raise FileNotFoundError(f"{bundle.root}: the manifest lists no golden trace")
        self.path = bundle.root / meta["trace"]
        self.meta = meta
        self.data = read_arrays(self.path)
        self.ios = [bundle.io(k + 1) for k in range(bundle.num_stacks)]
        for key in ("prompt", "tokens"):
            if key not in self.data or self.data[key].dtype.kind not in "iu":
                raise StagError(f"{self.path}: no integer array {key!r} (not a golden trace)")
        self.prompt = self.data["prompt"]
        self.tokens = self.data["tokens"]
        try:
            steps = {int(k.split("/")[0][1:]) for k in self.data if "/" in k}
        except ValueError:
            raise StagError(f"{self.path}: keys should be s<step>/<stack>/<name>") from None
        if not steps:
            raise StagError(f"{self.path}: no recorded steps (not a golden trace)")
        self.num_steps = max(steps) + 1

    def _record(self, step: int, stack: int, io: dict, kind: str) -> dict:
        return {t["name"]: self.data[f"s{step}/{stack}/{t['name']}"]
                for t in io[kind] if f"s{step}/{stack}/{t['name']}" in self.data}

    def steps(self, dtype: str | None = None):
        """Yield TraceStep for every (step, stack); float inputs cast to `dtype` if given."""
        rings = Rings(self.ios, self.prompt.shape[0])
        cast = np_dtype(dtype) if dtype else None
        for step in range(self.num_steps):
            for k, io in enumerate(self.ios):
                inputs = self._record(step, k + 1, io, "inputs")
                golden = self._record(step, k + 1, io, "outputs")
                pos = int(inputs["pos"][0])
                feeds = dict(inputs)
                feeds.update({n: r.copy() for n, r in rings.rings[k].items()})
                if cast is not None:
                    feeds = {n: a.astype(cast) if a.dtype.kind == "f" else a
                             for n, a in feeds.items()}
                yield TraceStep(step, k + 1, feeds, golden)
                rings.commit_stack(k, golden, inputs, pos)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, read without pickle; numbers and booleans only."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StagError(f"{path}: not a readable golden trace ({' '.join(str(exc).split())})") \
            from None
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise StagError(f"{path}: array {key!r} has dtype {arr.dtype}; expected numbers")
    return arrays


def load_trace(root: Path) -> Trace:
    return Trace(Bundle.load(root, verify=False))
