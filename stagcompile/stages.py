"""Small stage functions behind `stagcompile init` and `stagcompile inspect`.

`init_checkpoint` needs torch (it builds the model); `inspect_report` reads only the config, from a
checkpoint's config.json or a bundle's manifest.json, so it works without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from stagcompile.analysis import report
from stagcompile.atomic import check_target
from stagcompile.config import StagConfig, load_config, preset
from stagcompile.errors import StagError
from stagcompile.progress import table_console

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def init_checkpoint(preset_name: str, output: Path, seed: int, overrides: list[str],
                    force: bool) -> Path:
    import torch

    from stagcompile import checkpoint
    from stagcompile.model import StagFormer

    cfg = preset(preset_name).with_overrides(overrides)
    output = Path(output)
    check_target(output, force, "checkpoint")
    torch.manual_seed(seed)
    try:
        model = StagFormer(cfg)
        model.reset_parameters(seed)
    except (RuntimeError, MemoryError) as exc:
        params = report(cfg)["parameters"]
        raise StagError(f"this config's model has {params:,} parameters ({params * 4 / 2**30:,.1f} "
                        f"GiB in fp32) and cannot be allocated here: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return checkpoint.save(model, output, force=force)


def config_of(path: Path) -> StagConfig:
    """The config of a checkpoint folder or of a bundle (its manifest)."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            return StagConfig.from_dict(json.loads(manifest.read_text())["config"], str(manifest))
        except (KeyError, json.JSONDecodeError) as exc:
            raise StagError(f"{manifest}: not a stagcompile manifest ({exc})") from None
    return load_config(path)


def inspect_report(path: Path, dtype: str = "fp32", context: int | None = None) -> dict:
    cfg = config_of(path)
    if context is not None and context < 1:
        raise StagError(f"--context {context}: must be >= 1")
    rep = report(cfg, DTYPE_NAMES[dtype], context)
    rep["path"] = str(path)
    return rep


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def print_inspect(rep: dict) -> None:
    con = table_console()
    cfg = rep["config"]
    t = Table(title=f"config of {rep['path']}", show_header=False)
    for k, v in cfg.items():
        t.add_row(k, str(v))
    con.print(t)
    s = Table(title=f"per decode step, batch 1, context {rep['context']}, {rep['dtype']}")
    for col in ("stack", "params owned", "params used", "GFLOP/token", "weight bytes/token",
                "self KV/token", "cross KV/token", "self KV at cap.", "cross KV at cap."):
        s.add_column(col, justify="right")
    for st in rep["stacks"]:
        s.add_row(str(st["stack"]), f"{st['params_owned']:,}", f"{st['params_used']:,}",
                  f"{st['flops'] / 1e9:.4f}", _mib(st["weight_bytes"]),
                  f"{st['self_kv_bytes_per_token']:,} B", f"{st['cross_kv_bytes_per_token']:,} B",
                  _mib(st["self_kv_bytes"]), _mib(st["cross_kv_bytes"]))
    con.print(s)
    con.print(f"parameters: {rep['parameters']:,}")
    if rep["shared"]:
        con.print(f"shared weights: {rep['shared']}")
    con.print(f"KV cache: {rep['kv_bytes_per_token']:,} B per token, "
              f"{_mib(rep['kv_bytes_at_capacity'])} at capacity")
    con.print(f"ideal staggered speedup (sequential step / slowest stack): "
              f"{rep['ideal_staggered_speedup']:.2f}x")
