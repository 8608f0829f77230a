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


class Flavour(str, Enum):
    portable = "portable"
    plugin = "plugin"
    both = "both"


@app.command()
@stage
def export(checkpoint: Path = typer.Argument(..., help="Checkpoint folder (config.json, "
                                             "model.safetensors[, tokenizer.json])."),
           output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to write."),
           flavour: Flavour = typer.Option(Flavour.both, help="portable: standard ONNX ops only; "
                                           "plugin: one stagformer attention node per call."),
           dtype: Dtype = typer.Option(Dtype.fp32, help="Weight, activation and cache dtype "
                                       "(softmax, norms and logits stay fp32)."),
           max_seq_len: Optional[int] = typer.Option(None, help="Cache capacity for unbounded "
                                                     "attention (default: the config's)."),
           max_batch: int = typer.Option(8, help="Largest batch the bundle serves."),
           force: bool = typer.Option(False, help="Replace an existing bundle.")):
    """Export one ONNX graph per stack, the manifest, a golden trace and the runtime."""
    from stagcompile.export import export_bundle
    out = export_bundle(checkpoint, output, flavour.value, dtype.value, max_seq_len, max_batch,
                        force)
    console.print(f"wrote bundle {out}")


class Backend(str, Enum):
    ort = "ort"
    trt = "trt"


class Schedule(str, Enum):
    staggered = "staggered"
    sequential = "sequential"


@app.command(context_settings={"allow_extra_args": False})
@stage
def run(bundle: Path = typer.Argument(..., help="Bundle folder."),
        prompt: List[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeat for a "
                                         "batch; prompts must tokenize to the same length)."),
        ids: List[str] = typer.Option([], "--ids", help="Comma-separated token ids instead of "
                                      "text (repeat for a batch)."),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
        backend: Backend = typer.Option(Backend.ort, help="ort (ONNX Runtime) or trt (TensorRT "
                                        "engines from `stagcompile build`)."),
        schedule: Schedule = typer.Option(Schedule.staggered, help="staggered: all stacks of a "
                                          "step at once; sequential: one after another."),
        threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads per "
                                              "stack (default: 1 staggered, all cores sequential)."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
        seed: Optional[int] = typer.Option(None, help="Sampling seed."),
        eos_id: Optional[int] = typer.Option(None, help="Stop token id.")):
    """Generate with a bundle's runtime: streams text, then prints the latency summary."""
    from stagcompile.runtime.cli import main as runtime_main
    argv = ["--bundle", str(bundle), "--max-new-tokens", str(max_new_tokens),
            "--backend", backend.value, "--schedule", schedule.value,
            "--temperature", str(temperature), "--top-k", str(top_k), "--top-p", str(top_p)]
    for flag, values in (("--prompt", prompt), ("--ids", ids)):
        for v in values:
            argv += [flag, v]
    for flag, value in (("--threads", threads), ("--seed", seed), ("--eos-id", eos_id)):
        if value is not None:
            argv += [flag, str(value)]
    if not prompt and not ids:
        raise typer.BadParameter("give --prompt or --ids")
    raise typer.Exit(runtime_main(argv))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
