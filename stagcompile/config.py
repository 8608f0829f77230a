"""The one configuration object that travels the whole pipeline.

`StagConfig` is a frozen dataclass describing a StagFormer (DESIGN.md section 1): a decoder of
`num_stacks * layers_per_stack` Llama-style layers split into `num_stacks` stacks. It is validated at
construction: every invalid value or combination raises `ConfigError` with a message that names the
field, the value and what is allowed. It round-trips through JSON (`to_json` / `from_json`), and
command-line overrides (`--set key=value`) are parsed with the field's own type (`with_overrides`).
Fields added after the first release have defaults that reproduce the earlier model, so older
`config.json` files (which lack them) load unchanged; `cross_gate` (a learned tanh gate on each
cross-attention, zero at initialisation) is one.

Named presets:

| preset | use | shape |
|---|---|---|
| tiny  | tests | d 64, 4 heads (2 kv), head_dim 16, 2 x 2 layers, vocab 97 |
| demo  | the shipped checkpoint | d 192, 4 heads, 2 x 2 layers, vocab 4096 |
| small | benchmarks | d 512, 8 heads, 2 x 4 layers, vocab 4096 |
| base  | benchmarks | d 768, 12 heads, 2 x 6 layers, vocab 32000 (about GPT-2 small) |
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from stagcompile.errors import CheckpointError, StagError

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
MAX_DIM = 2**31 - 1     # largest size or length a config field may give (an int32 dimension)


class ConfigError(StagError, ValueError):
    """An invalid configuration value, combination or file."""


@dataclass(frozen=True)
class StagConfig:
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    num_stacks: int = 2
    layers_per_stack: int = 2
    shared_weights: bool = False
    cross_window: Optional[int] = None
    self_window: Optional[int] = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True     # False: a separate LM head `lm_head.weight` (imported models)
    cross_gate: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _check_type(f.name, value, _FIELD_TYPES[f.name]))
        positive = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "num_stacks",
                    "layers_per_stack", "max_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name}={getattr(self, name)!r}: must be >= 1")
            if getattr(self, name) > MAX_DIM:
                raise ConfigError(f"config field {name}={getattr(self, name)!r}: must be <= "
                                  f"{MAX_DIM} (a tensor dimension)")
        for name in ("cross_window", "self_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(
                    f"config field {name}={value!r}: must be null (unbounded) or an integer >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config field d_model={self.d_model}: must be divisible by "
                              f"n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config field n_kv_heads={self.n_kv_heads}: must divide "
                              f"n_heads={self.n_heads} (grouped-query attention)")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"config field d_model={self.d_model}: head_dim "
                              f"{self.d_model // self.n_heads} must be even for RoPE")
        if self.shared_weights and self.num_stacks == 1:
            raise ConfigError("config field shared_weights=true: needs num_stacks >= 2 "
                              "(a single stack has nothing to share)")
        if self.cross_window is not None and self.num_stacks == 1:
            raise ConfigError(f"config field cross_window={self.cross_window}: needs "
                              "num_stacks >= 2 (a single stack has no cross-attention)")
        if self.cross_gate and self.num_stacks == 1:
            raise ConfigError("config field cross_gate=true: needs num_stacks >= 2 (a single "
                              "stack has no cross-attention to gate)")
        if self.rope_theta <= 1.0:
            raise ConfigError(f"config field rope_theta={self.rope_theta}: must be > 1")
        if not 0.0 < self.norm_eps < 1.0:
            raise ConfigError(f"config field norm_eps={self.norm_eps}: must be in (0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_layers(self) -> int:
        return self.num_stacks * self.layers_per_stack

    def self_capacity(self) -> int:
        """Ring slots of a self-attention cache: the window, or max_seq_len when unbounded."""
        return self.self_window if self.self_window is not None else self.max_seq_len

    def cross_capacity(self) -> int:
        """Ring slots of a cross-attention (memory) cache."""
        return self.cross_window if self.cross_window is not None else self.max_seq_len

    @property
    def unbounded_length(self) -> bool:
        """True when every attention is windowed, so generation may run past max_seq_len."""
        bounded_self = self.self_window is not None
        bounded_cross = self.num_stacks == 1 or self.cross_window is not None
        return bounded_self and bounded_cross

    def replace(self, **changes: Any) -> "StagConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "StagConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields, "
                              f"got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(known))}")
        missing = sorted(f.name for f in fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"{source}: missing config field(s) {', '.join(missing)}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "StagConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: Path) -> "StagConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found (expected a StagConfig JSON file)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        return cls.from_json(text, str(path))

    def with_overrides(self, assignments: list[str]) -> "StagConfig":
        """Apply `key=value` strings (from `--set`), each parsed with the field's type."""
        changes: dict[str, Any] = {}
        names = {f.name for f in fields(self)}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"--set {item!r}: expected key=value")
            if key not in names:
                raise ConfigError(f"--set {item!r}: unknown config field {key!r}; "
                                  f"allowed: {', '.join(sorted(names))}")
            changes[key] = _parse_value(key, raw.strip())
        return self.replace(**changes)


_FIELD_TYPES = {
    "vocab_size": int, "d_model": int, "n_heads": int, "n_kv_heads": int, "d_ff": int,
    "num_stacks": int, "layers_per_stack": int, "shared_weights": bool,
    "cross_window": "optional int", "self_window": "optional int", "max_seq_len": int,
    "rope_theta": float, "norm_eps": float, "tie_embeddings": bool, "cross_gate": bool,
}


def _type_name(kind: Any) -> str:
    return {int: "an integer", bool: "true or false", float: "a number",
            "optional int": "null or an integer"}[kind]


def _check_type(name: str, value: Any, kind: Any) -> Any:
    if kind == "optional int":
        if value is None:
            return None
        kind = int
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"config field {name}={value!r}: must be a finite number")
        return number
    raise ConfigError(f"config field {name}={value!r}: expected {_type_name(_FIELD_TYPES[name])}, "
                      f"got {type(value).__name__}")


def _parse_value(name: str, raw: str) -> Any:
    kind = _FIELD_TYPES[name]
    low = raw.lower()
    try:
        if kind == "optional int":
            return None if low in ("none", "null", "") else int(raw)
        if kind is bool:
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--set {name}={raw}: expected {_type_name(kind)}") from None


PRESETS: dict[str, StagConfig] = {
    "tiny": StagConfig(vocab_size=97, d_model=64, n_heads=4, n_kv_heads=2, d_ff=64,
                       num_stacks=2, layers_per_stack=2, max_seq_len=64),
    "demo": StagConfig(vocab_size=4096, d_model=192, n_heads=4, n_kv_heads=4, d_ff=512,
                       num_stacks=2, layers_per_stack=2, max_seq_len=256),
    "small": StagConfig(vocab_size=4096, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1408,
                        num_stacks=2, layers_per_stack=4, max_seq_len=2048),
    "base": StagConfig(vocab_size=32000, d_model=768, n_heads=12, n_kv_heads=12, d_ff=2048,
                       num_stacks=2, layers_per_stack=6, max_seq_len=2048),
}


def load_config(path: Path) -> StagConfig:
    """The config of a checkpoint directory (no torch needed)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a folder with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return StagConfig.load(path / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def preset(name: str) -> StagConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
