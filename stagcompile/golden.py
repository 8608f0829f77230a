"""Golden traces: what every stack graph must compute, recorded from the PyTorch reference.

A trace is the reference's greedy run (prefill of a prompt, then decode steps) seen through the
graphs' I/O tables: for each step and stack, the non-cache inputs (`input_ids`, `pos`,
`cross_in.*`) and every output. Cache inputs are not stored: they are the ring commits of earlier
steps' `new_self.*` and `cross_in.*`, which `stagcompile.runtime.rings` replays in numpy, so a
trace stays proportional to the new entries, never to the cache capacity.

Arrays live in one `.npz` (keys `s{step}/{stack}/{name}`), the metadata in the manifest.
The trace is recorded in fp32 whatever the bundle's dtype: it is the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from graphs.io import stack_io
from stagcompile.generate import CachedDecoder
from stagcompile.model import StagFormer


def _named(io_table, values: dict) -> dict:
    return {t.name: values[t.name] for t in io_table if t.name in values}


class _Recorder(CachedDecoder):
    null_at_decode = True       # a graph emits every output at every step: record them all

    def __init__(self, model: StagFormer, batch: int):
        super().__init__(model, batch)
        self.steps: list[dict] = []
        self.ios = [stack_io(model.cfg, k, "float32") for k in range(model.cfg.num_stacks)]

    def run_stack(self, k, ids, pos, cross_in, emit_for=None, with_null=True):
        out = super().run_stack(k, ids, pos, cross_in, emit_for, with_null)
        vals = {"input_ids": ids, "pos": pos}
        for role, pairs in (("cross_in", cross_in), ("new_self", out.new_self),
                            ("cross_out", out.cross_out), ("cross_null", out.cross_null)):
            for l, (kk, vv) in enumerate(pairs or []):
                vals[f"{role}.k.{l}"], vals[f"{role}.v.{l}"] = kk, vv
        if out.logits is not None:
            vals["logits"] = out.logits
        vals = {n: v.detach().numpy().copy() for n, v in vals.items()}
        io = self.ios[k]
        if k == 0:
            self.steps.append({})
        self.steps[-1][k + 1] = {"inputs": _named(io.inputs, vals),
                                 "outputs": _named(io.outputs, vals)}
        return out


@torch.no_grad()
def record(model: StagFormer, prompt: np.ndarray, steps: int) -> tuple[list[dict], np.ndarray]:
    """Run greedy decoding of `steps` tokens after `prompt` [B, T] on the fp32 reference.

    Returns the per-step records ({stack: {"inputs", "outputs"}}) and the tokens [B, steps]."""
    model = model.float().eval()
    rec = _Recorder(model, prompt.shape[0])
    logits = rec.prefill(torch.from_numpy(prompt))[:, -1]
    tokens = []
    for i in range(steps):
        tok = logits.argmax(-1)
        tokens.append(tok.numpy())
        if i + 1 < steps:
            logits = rec.step(tok)
    return rec.steps, np.stack(tokens, 1)


def default_steps(cfg) -> int:
    """Decode steps that pass every window at least twice (bounded by the capacity)."""
    windows = [w for w in (cfg.self_window, cfg.cross_window) if w]
    return max(8, *(2 * w + 2 for w in windows)) if windows else 8


def save(path: Path, steps: list[dict], prompt: np.ndarray, tokens: np.ndarray) -> None:
    arrays = {"prompt": prompt, "tokens": tokens}
    for t, step in enumerate(steps):
        for stack, rec in step.items():
            for kind in ("inputs", "outputs"):
                for name, arr in rec[kind].items():
                    arrays[f"s{t}/{stack}/{name}"] = arr
    np.savez_compressed(path, **arrays)
