"""The I/O name table of every stack graph: names, dtypes, shapes (symbolic batch/seq, fixed
cache capacity) and roles. Export writes it into manifest.json; the runtime reads it from there.
No torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

from stagcompile.config import StagConfig

BATCH, SEQ = "batch", "seq"
Dim = Union[int, str]

# role -> name template
NAMES = {
    "input_ids": "input_ids", "pos": "pos",
    "self": "self.{kv}.{layer}", "cross": "cross.{kv}.{layer}", "cross_in": "cross_in.{kv}.{layer}",
    "new_self": "new_self.{kv}.{layer}", "cross_out": "cross_out.{kv}.{layer}",
    "cross_null": "cross_null.{kv}.{layer}", "logits": "logits",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    dtype: str
    shape: tuple[Dim, ...]
    layer: Optional[int] = None
    kv: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(**(d | {"shape": tuple(d["shape"])}))


@dataclass(frozen=True)
class GraphIO:
    stack: int                      # 1-based stack number
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def names(self, role: str, io: str = "inputs") -> list[str]:
        return [t.name for t in getattr(self, io) if t.role == role]

    def to_dict(self) -> dict:
        return {"stack": self.stack, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphIO":
        return cls(d["stack"], tuple(map(TensorInfo.from_dict, d["inputs"])),
                   tuple(map(TensorInfo.from_dict, d["outputs"])))


def _kv_tensors(role: str, cfg: StagConfig, dtype: str, length: Dim) -> list[TensorInfo]:
    shape = (BATCH, cfg.n_kv_heads, length, cfg.head_dim)
    return [TensorInfo(NAMES[role].format(kv=kv, layer=l), role, dtype, shape, l, kv)
            for l in range(cfg.layers_per_stack) for kv in ("k", "v")]


def stack_io(cfg: StagConfig, stack: int, dtype: str, emits: bool | None = None) -> GraphIO:
    """The I/O of 0-based stack `stack`. `emits` (default: a next stack exists) adds the cross
    entries this stack produces for its consumer."""
    last = stack == cfg.num_stacks - 1
    emits = (not last) if emits is None else emits
    inputs = [TensorInfo("input_ids", "input_ids", "int64", (BATCH, SEQ)),
              TensorInfo("pos", "pos", "int64", (BATCH,))]
    inputs += _kv_tensors("self", cfg, dtype, cfg.self_capacity())
    if stack > 0:
        inputs += _kv_tensors("cross", cfg, dtype, cfg.cross_capacity())
        inputs += _kv_tensors("cross_in", cfg, dtype, SEQ)
    outputs = _kv_tensors("new_self", cfg, dtype, SEQ)
    if emits:
        outputs += _kv_tensors("cross_out", cfg, dtype, SEQ)
        outputs += _kv_tensors("cross_null", cfg, dtype, 1)
    if last:
        outputs.append(TensorInfo("logits", "logits", "float32", (BATCH, SEQ, cfg.vocab_size)))
    return GraphIO(stack + 1, tuple(inputs), tuple(outputs))
