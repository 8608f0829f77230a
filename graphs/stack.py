"""`StackGraph`: the torch module each stack's ONNX graph is exported from.

It wraps the reference model's cached path (`StagFormer.stack_step`) with flat positional I/O in
the order of the I/O table (`graphs.io.stack_io`), so the exported graph computes exactly what
the reference's cached decoding computes. Example inputs use batch 2 and seq 3 so torch.export
does not specialise the dynamic dimensions to 1.
"""

from __future__ import annotations

import torch
from torch import nn

from graphs.io import BATCH, SEQ, GraphIO, stack_io
from stagcompile.model import StagFormer

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64}


class StackGraph(nn.Module):
    def __init__(self, model: StagFormer, stack: int, dtype: str, emit_for: int | None = None):
        super().__init__()
        self.model, self.stack, self.emit_for = model, stack, emit_for
        self.io: GraphIO = stack_io(model.cfg, stack, dtype,
                                    emits=None if emit_for is None else True)

    def _pairs(self, tensors: dict, role: str) -> list:
        n = self.model.cfg.layers_per_stack
        return [(tensors[f"{role}.k.{l}"], tensors[f"{role}.v.{l}"]) for l in range(n)]

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = {t.name: x for t, x in zip(self.io.inputs, flat)}
        k = self.stack
        out = self.model.stack_step(
            k, named["input_ids"], named["pos"], self._pairs(named, "self"),
            self._pairs(named, "cross") if k > 0 else None,
            self._pairs(named, "cross_in") if k > 0 else None, emit_for=self.emit_for)
        produced = {}
        for role, pairs in (("new_self", out.new_self), ("cross_out", out.cross_out),
                            ("cross_null", out.cross_null)):
            for l, (kk, vv) in enumerate(pairs or []):
                produced[f"{role}.k.{l}"], produced[f"{role}.v.{l}"] = kk, vv
        if out.logits is not None:
            produced["logits"] = out.logits
        return tuple(produced[t.name] for t in self.io.outputs)

    def example_inputs(self, batch: int = 2, seq: int = 3) -> tuple[torch.Tensor, ...]:
        sizes = {BATCH: batch, SEQ: seq}
        gen = torch.Generator().manual_seed(0)
        out = []
        for t in self.io.inputs:
            shape = [sizes.get(d, d) for d in t.shape]
            if t.role == "input_ids":
                out.append(torch.randint(0, self.model.cfg.vocab_size, shape, generator=gen))
            elif t.role == "pos":
                out.append(torch.zeros(shape, dtype=torch.int64))
            else:
                out.append(torch.randn(shape, generator=gen).to(TORCH_DTYPES[t.dtype]))
        return tuple(out)

    def dynamic_shapes(self, max_batch: int, max_seq: int) -> tuple[dict, ...]:
        batch = torch.export.Dim(BATCH, min=1, max=max_batch)
        seq = torch.export.Dim(SEQ, min=1, max=max_seq)
        dims = {BATCH: batch, SEQ: seq}
        return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)}
                     for t in self.io.inputs)
