"""Checkpoint directories: `config.json` + `model.safetensors` (+ optional `tokenizer.json`).

Loading validates before it builds anything: the config parses and passes `StagConfig`'s checks,
and every tensor of the safetensors file is compared with what the config implies; all missing,
unexpected and mismatched tensors (name, shape, dtype) are reported in one `CheckpointError`.
Weights may be fp32, fp16 or bf16 (one dtype per file), and must be finite (a NaN or inf weight
is refused, naming the tensors). Saving writes to a temporary folder and
renames it, so an interrupted save never leaves a half checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stagcompile.atomic import atomic_dir
from stagcompile.config import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, StagConfig, load_config
from stagcompile.errors import CheckpointError
from stagcompile.model import StagFormer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def expected_tensors(cfg: StagConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `cfg` holds (built on the meta device)."""
    with torch.device("meta"):
        model = StagFormer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def read_weights(path: Path, cfg: StagConfig) -> dict[str, torch.Tensor]:
    """Read and validate `model.safetensors` against `cfg`."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found (expected the model weights in "
                              "safetensors format)")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): "
                              f"{exc}") from None
    want = expected_tensors(cfg)
    problems = []
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    mismatched = [f"{n} has shape {tuple(tensors[n].shape)}, config implies {want[n]}"
                  for n in sorted(set(want) & set(tensors)) if tuple(tensors[n].shape) != want[n]]
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    bad_types = sorted(dtypes - set(DTYPES))
    if bad_types:
        mismatched.append(f"dtype {', '.join(bad_types)} not supported (use "
                          f"{', '.join(DTYPES)})")
    elif len(dtypes) > 1:
        mismatched.append(f"mixed dtypes {', '.join(sorted(dtypes))}; expected one dtype")
    if mismatched:
        problems.append("mismatched: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(f"{file} does not match {Path(path) / CONFIG_FILE}: "
                              + " | ".join(problems))
    check_finite(file, tensors)
    return tensors


def check_finite(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights with NaN or inf values, naming the tensors."""
    bad = {n: int((~torch.isfinite(t)).sum()) for n, t in tensors.items()
           if not bool(torch.isfinite(t).all())}
    if bad:
        named = [f"{n} ({c:,} of {tensors[n].numel():,})" for n, c in sorted(bad.items())]
        more = f" and {len(named) - 5} more" if len(named) > 5 else ""
        raise CheckpointError(f"{file}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                              f"{', '.join(named[:5])}{more}")


def load(path: Path, dtype: torch.dtype | None = torch.float32) -> StagFormer:
    """Load a checkpoint into an eval-mode reference model (cast to `dtype`; None keeps it)."""
    cfg = load_config(path)
    tensors = read_weights(path, cfg)
    with torch.device("meta"):
        model = StagFormer(cfg)
    model.load_state_dict(tensors, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save(model: StagFormer, path: Path, dtype: torch.dtype | None = None,
         tokenizer: Path | None = None, extra_files: dict[str, str | bytes] | None = None,
         force: bool = True, sources=()) -> Path:
    """Write a checkpoint directory atomically; returns its path. With `force` an existing
    checkpoint is replaced; never another folder, nor one that holds `sources` (see atomic)."""
    with atomic_dir(path, force, "checkpoint", sources) as tmp:
        (tmp / CONFIG_FILE).write_text(model.cfg.to_json() + "\n")
        state = {n: (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous()
                 for n, t in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "stagcompile"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return Path(path)


def tokenizer_path(path: Path) -> Path | None:
    file = Path(path) / TOKENIZER_FILE
    return file if file.is_file() else None
