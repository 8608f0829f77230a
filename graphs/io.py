"""The I/O name table of every stack graph: names, dtypes, shapes (symbolic batch/seq, fixed
cache capacity) and roles. Export writes it into manifest.json; the runtime reads it from there.
No torch here.

Two layouts:

- `stack_io` (portable and plugin flavours): ring caches [batch, Hkv, C, D] that the graph only
  reads; new entries are outputs (`new_self.*`, `cross_out.*`) the runtime commits.
- `ort_stack_io` (ort flavour, ONNX Runtime's GroupQueryAttention): caches the graph updates in
  place. Each cache input `self.*` / `cross.*` has an output `present.self.*` / `present.cross.*`
  whose `alias` names it: the runtime binds both to one buffer. New cross entries travel as
  [batch, seq, Hkv * D] (the layout GroupQueryAttention reads), keys not yet rotated (the
  consumer rotates them at their memory position), and only the last position's logits are
  computed.
"""

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
    "present_self": "present.self.{kv}.{layer}", "present_cross": "present.cross.{kv}.{layer}",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    dtype: str
    shape: tuple[Dim, ...]
    layer: Optional[int] = None
    kv: Optional[str] = None
    alias: Optional[str] = None     # an output written in place over this input (ort flavour)

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


def _kv_tensors(role: str, cfg: StagConfig, dtype: str, length: Dim,
               packed: bool = False, alias_of: str | None = None) -> list[TensorInfo]:
    """Per layer k and v tensors of `role`: [batch, Hkv, length, D], or [batch, length, Hkv * D]
    when `packed`; `alias_of` names the role of the input each one overwrites in place."""
    shape = ((BATCH, length, cfg.n_kv_heads * cfg.head_dim) if packed
             else (BATCH, cfg.n_kv_heads, length, cfg.head_dim))
    return [TensorInfo(NAMES[role].format(kv=kv, layer=l), role, dtype, shape, l, kv,
                       NAMES[alias_of].format(kv=kv, layer=l) if alias_of else None)
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


def ort_capacity(window: int | None, max_seq_len: int) -> int:
    """Cache rows of the ort flavour: max_seq_len for unbounded attention; twice the window for a
    window (GroupQueryAttention's sliding-window cache compacts once every window + 1 steps
    instead of at every step)."""
    return max_seq_len if window is None else 2 * window


def ort_stack_io(cfg: StagConfig, stack: int, dtype: str) -> GraphIO:
    """The I/O of 0-based `stack` in the ort flavour (see the module docstring)."""
    last = stack == cfg.num_stacks - 1
    self_cap = ort_capacity(cfg.self_window, cfg.max_seq_len)
    inputs = [TensorInfo("input_ids", "input_ids", "int64", (BATCH, SEQ)),
              TensorInfo("pos", "pos", "int64", (BATCH,))]
    inputs += _kv_tensors("self", cfg, dtype, self_cap)
    outputs = _kv_tensors("present_self", cfg, dtype, self_cap, alias_of="self")
    if stack > 0:
        cross_cap = ort_capacity(cfg.cross_window, cfg.max_seq_len)
        inputs += _kv_tensors("cross", cfg, dtype, cross_cap)
        inputs += _kv_tensors("cross_in", cfg, dtype, SEQ, packed=True)
        outputs += _kv_tensors("present_cross", cfg, dtype, cross_cap, alias_of="cross")
    if not last:
        outputs += _kv_tensors("cross_out", cfg, dtype, SEQ, packed=True)
        outputs += _kv_tensors("cross_null", cfg, dtype, 1, packed=True)
    else:
        outputs.append(TensorInfo("logits", "logits", "float32", (BATCH, 1, cfg.vocab_size)))
    return GraphIO(stack + 1, tuple(inputs), tuple(outputs))
