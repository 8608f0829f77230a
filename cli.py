"""`stagcompile`: the command line. Each command only parses its options and calls one stage
function; stages import torch (export, train) or TensorRT (build) lazily, so `build`, `run`,
`validate` and `bench` on a bundle work where torch is not installed.

Errors from bad input are printed as one line (`error: ...`) and exit with status 1.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Deployment compiler for StagFormer language models: checkpoint -> per-stack ONNX graphs "
         "-> TensorRT engines -> a concurrent runtime, validated against the PyTorch reference.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)


def stage(fn):
    """Turn StagError (and Ctrl-C) into a one-line message and a non-zero exit."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        from stagcompile.errors import StagError
        try:
            return fn(*args, **kwargs)
        except StagError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
    return wrapper


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@app.command()
@stage
def init(preset: str = typer.Option(..., "--preset", "-p", help="tiny, demo, small or base."),
         output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write."),
         seed: int = typer.Option(0, help="Seed of the random initialisation."),
         set_: List[str] = typer.Option([], "--set", help="Override a config field: key=value "
                                         "(repeatable), e.g. --set num_stacks=3."),
         force: bool = typer.Option(False, help="Replace an existing checkpoint folder.")):
    """Write a randomly initialised checkpoint (config.json + model.safetensors)."""
    from stagcompile.stages import init_checkpoint
    path = init_checkpoint(preset, output, seed, set_, force)
    console.print(f"wrote {path}")


@app.command()
@stage
def inspect(checkpoint: Path = typer.Argument(..., help="Checkpoint folder (or a bundle)."),
            context: Optional[int] = typer.Option(None, help="Context length for the attention "
                                                  "cost (default: max_seq_len)."),
            dtype: Dtype = typer.Option(Dtype.fp32, help="Weight/cache dtype for byte counts."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")):
    """Config, parameters per stack, per-step FLOPs and bytes, KV-cache sizes, ideal speedup."""
    from stagcompile.stages import inspect_report, print_inspect
    rep = inspect_report(checkpoint, dtype.value, context)
    if as_json:
        print(json.dumps(rep, indent=2))
    else:
        print_inspect(rep)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
