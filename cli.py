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
from rich.markup import escape

app = typer.Typer(
    help="Deployment compiler for StagFormer language models: checkpoint -> per-stack ONNX graphs "
         "-> TensorRT engines -> a concurrent runtime, validated against the PyTorch reference.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)


def stage(fn):
    """Turn StagError (and Ctrl-C, SIGTERM) into a one-line message and a non-zero exit."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        from stagcompile.errors import StagError, Terminated
        from stagcompile.runtime.bundle import BundleError
        from stagcompile.runtime.scheduler import CapacityError
        try:
            return fn(*args, **kwargs)
        except (StagError, BundleError, CapacityError) as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
        except Terminated:
            console.print("[bold red]terminated[/] (SIGTERM); the unfinished output was removed")
            raise typer.Exit(143)
    return wrapper


def _version(value: bool) -> None:
    if value:
        from stagcompile import __version__
        print(f"stagcompile {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version,
                                              is_eager=True, help="Print the version and exit.")):
    """Deployment compiler for StagFormer language models."""


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


@app.command("import-hf")
@stage
def import_hf(folder: Path = typer.Argument(..., help="Local Hugging Face Llama or Mistral folder "
                                            "(config.json, model.safetensors, tokenizer.json)."),
              output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write."),
              restack: Optional[int] = typer.Option(None, help="Split the layers into P stacks "
                                                    "of a StagFormer (cross-attention starting "
                                                    "as a no-op), for fine-tuning."),
              force: bool = typer.Option(False, help="Replace an existing checkpoint folder.")):
    """Turn a Hugging Face Llama into a checkpoint (P = 1, or restacked into P stacks)."""
    from stagcompile.hf import import_hf as run_import
    path = run_import(folder, output, restack, force)
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


class QkvTable(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


QKV_TABLE_HELP = ("ort graphs: the first layer's Q|K|V of each stack from a per-token table "
                  "precomputed at export (one row read per token instead of the projection "
                  "weight; costs vocab/d_model times its memory). auto: on when vocab <= 16 x "
                  "d_model and the weights are not quantized.")


HUGE_PAGES_HELP = ("Back the ort backend's weights with transparent huge pages (Linux; fewer "
                   "TLB misses while a step streams the weights).")


class Flavour(str, Enum):
    all = "all"
    ort = "ort"
    portable = "portable"
    plugin = "plugin"
    both = "both"


@app.command()
@stage
def export(checkpoint: Path = typer.Argument(..., help="Checkpoint folder (config.json, "
                                             "model.safetensors[, tokenizer.json])."),
           output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to write."),
           flavour: Flavour = typer.Option(Flavour.all, help="ort: ONNX Runtime's contrib ops, "
                                           "caches updated in place (the fast CPU path); "
                                           "portable: standard ONNX ops only; plugin: one "
                                           "stagformer attention node per call (TensorRT); "
                                           "both: portable + plugin; all: the three."),
           dtype: Dtype = typer.Option(Dtype.fp32, help="Weight, activation and cache dtype "
                                       "(softmax, norms and logits stay fp32)."),
           max_seq_len: Optional[int] = typer.Option(None, help="Cache capacity for unbounded "
                                                     "attention (default: the config's)."),
           max_batch: int = typer.Option(8, help="Largest batch the bundle serves."),
           quant: Optional[str] = typer.Option(None, help="Weight-only quantization: int8 or "
                                               "int4 (MatMulNBits in the ort graphs, "
                                               "DequantizeLinear before each MatMul in the "
                                               "portable/plugin graphs)."),
           block_size: int = typer.Option(32, help="Weights per quantization block along K "
                                          "(a power of two >= 16)."),
           quant_embedding: bool = typer.Option(True, help="With --quant int4, also quantize "
                                                "the ort graphs' embedding "
                                                "(GatherBlockQuantized)."),
           qkv_table: QkvTable = typer.Option(QkvTable.auto, help=QKV_TABLE_HELP),
           force: bool = typer.Option(False, help="Replace an existing bundle.")):
    """Export one ONNX graph per stack, the manifest, a golden trace and the runtime."""
    from stagcompile.export import export_bundle
    out = export_bundle(checkpoint, output, flavour.value, dtype.value, max_seq_len, max_batch,
                        force, quant=quant, block_size=block_size,
                        quant_embedding=quant_embedding, qkv_table=qkv_table.value)
    console.print(f"wrote bundle {out}")


class Backend(str, Enum):
    ort = "ort"
    trt = "trt"
    ort_cuda = "ort-cuda"


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
        flavour: Optional[str] = typer.Option(None, help="Graphs the ort backend runs: ort, "
                                              "portable or plugin (default: ort when the bundle "
                                              "has them)."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
        seed: Optional[int] = typer.Option(None, help="Sampling seed (>= 0)."),
        eos_id: Optional[int] = typer.Option(None, help="Stop token id."),
        spinning: bool = typer.Option(False, help="Let idle ONNX Runtime threads spin (off by "
                                      "default: a spinning pool steals another stack's core)."),
        huge_pages: bool = typer.Option(True, help=HUGE_PAGES_HELP)):
    """Generate with a bundle's runtime: streams text, then prints the latency summary."""
    from stagcompile.errors import StagError
    from stagcompile.runtime.cli import main as runtime_main
    if not prompt and not ids:
        raise StagError("give --prompt TEXT or --ids 1,2,3")
    if prompt and ids:
        raise StagError("--prompt and --ids: give one of them, not both")
    argv = ["--bundle", str(bundle), "--max-new-tokens", str(max_new_tokens),
            "--backend", backend.value, "--schedule", schedule.value,
            "--temperature", str(temperature), "--top-k", str(top_k), "--top-p", str(top_p)]
    for flag, values in (("--prompt", prompt), ("--ids", ids)):
        for v in values:
            argv += [flag, v]
    for flag, value in (("--threads", threads), ("--seed", seed), ("--eos-id", eos_id),
                        ("--flavour", flavour)):
        if value is not None:
            argv += [flag, str(value)]
    if spinning:
        argv.append("--spinning")
    if not huge_pages:
        argv.append("--no-huge-pages")
    raise typer.Exit(runtime_main(argv))


@app.command()
@stage
def serve(bundle: Path = typer.Argument(..., help="Bundle folder."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="TCP port."),
          max_batch: Optional[int] = typer.Option(None, help="Rows decoded together (default: "
                                                  "the bundle's max_batch)."),
          schedule: Schedule = typer.Option(Schedule.staggered, help="staggered or sequential."),
          flavour: Optional[str] = typer.Option(None, help="Graphs to run: ort, portable or "
                                                "plugin (default: ort when the bundle has them)."),
          model_name: Optional[str] = typer.Option(None, help="Model id in the API (default: "
                                                   "the bundle folder's name).")):
    """Serve a bundle over OpenAI-compatible HTTP with in-flight batching (Ctrl-C stops)."""
    from stagcompile.errors import StagError
    try:
        from stagcompile.server import serve as run_server
    except ImportError as exc:
        raise StagError(f"serve needs the serve extra ({exc.name} is missing): "
                        "pip install 'stagcompile[serve]'") from None
    if not 0 < port < 65536:
        raise StagError(f"--port {port}: must be in 1..65535")
    try:
        run_server(bundle, host, port, max_batch, schedule.value, flavour, model_name)
    except ValueError as exc:
        raise StagError(str(exc)) from None


@app.command()
@stage
def triton(bundle: Path = typer.Argument(..., help="Bundle folder."),
           output: Path = typer.Option(..., "--output", "-o", help="Model repository to write."),
           model_name: str = typer.Option("stagformer", help="Model name in the repository."),
           max_batch: Optional[int] = typer.Option(None, help="Rows decoded together (default: "
                                                   "the bundle's max_batch)."),
           schedule: Schedule = typer.Option(Schedule.staggered, help="staggered or sequential."),
           force: bool = typer.Option(False, help="Replace an existing (empty) folder.")):
    """Write a Triton Inference Server model repository (Python backend, decoupled streaming)."""
    from stagcompile.triton_repo import write_repository
    out = write_repository(bundle, output, model_name, max_batch, schedule.value, force)
    console.print(f"wrote {out} (tritonserver --model-repository {out})")


@app.command()
@stage
def build(bundle: Path = typer.Argument(..., help="Bundle folder (from export or compile)."),
          precision: str = typer.Option("graph", help="graph: the exported dtype (strongly typed); "
                                        "fp16/bf16 from an fp32 graph only on TensorRT 10.x."),
          workspace: int = typer.Option(4096, help="Builder workspace limit in MiB."),
          timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, read and "
                                                      "updated (reused across builds)."),
          max_batch: Optional[int] = typer.Option(None, help="Largest batch of the profiles "
                                                  "(default: the bundle's max_batch)."),
          max_prefill: Optional[int] = typer.Option(None, help="Longest prefill chunk of the "
                                                    "prefill profile (default: max_seq_len)."),
          module: Optional[str] = typer.Option(None, help="Force the TensorRT module: tensorrt, "
                                               "tensorrt_rtx or tensorrt_rtx_bindings.")):
    """Build one TensorRT engine per stack (decode and prefill profiles) on this machine."""
    from stagcompile.build import build_engines
    res = build_engines(bundle, precision, workspace, timing_cache, max_batch, max_prefill, True,
                        module)
    console.print(f"built {len(res['files'])} engines ({res['flavour']} graphs: {res['reason']}); "
                  f"{res.get('built_for', '')}")


@app.command()
@stage
def validate(bundle: Path = typer.Argument(..., help="Bundle folder."),
             atol: Optional[float] = typer.Option(None, help="Absolute tolerance (default by "
                                                  "dtype: fp32 1e-4, fp16 5e-2, bf16 1.5e-1)."),
             rtol: Optional[float] = typer.Option(None, help="Relative tolerance (default by "
                                                  "dtype: fp32 1e-4, fp16 1e-2, bf16 2e-2)."),
             text: Optional[Path] = typer.Option(None, help="Also measure bits per byte on this "
                                                 "text (.txt or .txt.xz)."),
             reference: Optional[Path] = typer.Option(None, help="fp32 bundle of the same "
                                                      "checkpoint whose bits per byte a "
                                                      "quantized bundle is compared with."),
             min_agreement: Optional[float] = typer.Option(None, help="Quantized bundles: least "
                                                           "share of teacher-forced greedy "
                                                           "tokens equal to the reference's "
                                                           "(default: int8 0.9, int4 0.7)."),
             max_bpb_rise: Optional[float] = typer.Option(None, help="Quantized bundles: largest "
                                                          "relative rise of bits per byte over "
                                                          "the reference (default: int8 0.01, "
                                                          "int4 0.02).")):
    """Check every backend available here against the PyTorch reference's golden trace."""
    from stagcompile.errors import StagError
    from stagcompile.validate import print_report, validate_bundle
    report = validate_bundle(bundle, atol, rtol, text=text, reference=reference,
                             min_agreement=min_agreement, max_bpb_rise=max_bpb_rise)
    print_report(report)
    if not report.ran:
        raise StagError(f"{bundle}: nothing could be validated on this machine: "
                        + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()))
    if not report.passed:
        raise StagError(f"{bundle}: validation failed (details in validation/report.json)")


@app.command("compile")
@stage
def compile_(checkpoint: Path = typer.Argument(..., help="Checkpoint folder."),
             output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to write."),
             flavour: Flavour = typer.Option(Flavour.all, help="Graph flavours to export "
                                             "(see `export --help`)."),
             dtype: Dtype = typer.Option(Dtype.fp32, help="Weight/cache dtype."),
             max_seq_len: Optional[int] = typer.Option(None, help="Cache capacity for unbounded "
                                                       "attention (default: the config's)."),
             max_batch: int = typer.Option(8, help="Largest batch the bundle serves."),
             build: bool = typer.Option(True, help="Build TensorRT engines where possible."),
             qkv_table: QkvTable = typer.Option(QkvTable.auto, help=QKV_TABLE_HELP),
             force: bool = typer.Option(False, help="Replace an existing bundle.")):
    """Export, build (where TensorRT and a GPU exist), validate, and summarise."""
    from stagcompile.compile import compile_checkpoint
    compile_checkpoint(checkpoint, output, flavour.value, dtype.value, max_seq_len, max_batch,
                       force, build, qkv_table=qkv_table.value)


@app.command()
@stage
def train(texts: List[Path] = typer.Argument(..., help="Training text files (.txt or .txt.xz)."),
          output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write."),
          preset: str = typer.Option("demo", help="Model preset (tiny, demo, small, base)."),
          set_: List[str] = typer.Option([], "--set", help="Override a config field: key=value."),
          steps: int = typer.Option(1000, help="Optimizer steps."),
          batch_size: int = typer.Option(16, help="Sequences per step."),
          seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: 128, "
                                                "at most the model's max_seq_len)."),
          lr: float = typer.Option(3e-3, help="Peak learning rate (AdamW)."),
          warmup: int = typer.Option(50, help="Linear warm-up steps."),
          eval_every: int = typer.Option(100, help="Evaluate every N steps."),
          save_every: int = typer.Option(500, help="Write the checkpoint every N steps."),
          seed: int = typer.Option(0, help="Seed of the initialisation and the data order."),
          val: Optional[Path] = typer.Option(None, help="Validation text (default: the last 2% "
                                             "of the training text)."),
          vocab_size: Optional[int] = typer.Option(None, help="BPE vocabulary size (default: "
                                                   "the config's vocab_size, at least 257)."),
          tokenizer: Optional[Path] = typer.Option(None, help="Use this tokenizer.json instead "
                                                   "of training one."),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
          stack1_lr_mult: float = typer.Option(1.0, help="Learning-rate multiplier of the "
                                               "parameters only stack 1 uses."),
          aux_loss: float = typer.Option(0.0, help="Weight of a next-token loss on stack 1's "
                                         "output through the tied head (0: off)."),
          detach_memory: str = typer.Option("none", help="No gradient into stack 1 through the "
                                            "memory's keys, values or both (none: off)."),
          init_depth: str = typer.Option("model", help="Scale output projections' init by the "
                                         "model's depth (model) or one stack's (stack)."),
          resume: bool = typer.Option(False, help="Continue the checkpoint in --output.")):
    """Train a StagFormer with the reference model (byte-level BPE tokenizer included)."""
    from stagcompile.train import TrainOptions, train as run_training
    if threads:
        import torch
        torch.set_num_threads(threads)
    opts = TrainOptions(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                        eval_every=eval_every, save_every=save_every, seed=seed,
                        stack1_lr_mult=stack1_lr_mult, aux_loss=aux_loss,
                        detach_memory=detach_memory, init_depth=init_depth)
    log = run_training(texts, output, preset, set_, opts, resume, val, vocab_size, tokenizer)
    if log:
        last = log[-1]
        console.print(f"step {last['step']}: val loss {last['val_loss']:.4f}, perplexity "
                      f"{last['val_ppl']:.2f}, {last['val_bpb']:.4f} bits per byte -> {output}")


def _ints(flag: str, text: str) -> list[int]:
    from stagcompile.errors import StagError
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StagError(f"{flag} {text}: expected comma-separated integers") from None


@app.command()
@stage
def bench(checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder (or use "
                                                      "--preset for random weights)."),
          preset: Optional[str] = typer.Option(None, help="Benchmark a preset (tiny, demo, "
                                               "small, base) with random weights."),
          batch: str = typer.Option("1,8", help="Batch sizes, comma-separated."),
          context: str = typer.Option("128,1024", help="Context lengths, comma-separated."),
          window: str = typer.Option("unbounded,bounded", help="Cross windows to compare."),
          bounded_window: int = typer.Option(32, help="The bounded cross window."),
          backend: str = typer.Option("ort", help="ort (CPU threads) or trt (GPU streams)."),
          iters: int = typer.Option(20, help="Timed decode steps per round."),
          rounds: int = typer.Option(5, help="Interleaved rounds."),
          warmup: int = typer.Option(3, help="Untimed warm-up steps per configuration."),
          spinning: bool = typer.Option(False, help="Let idle ONNX Runtime threads spin."),
          torch_baseline: bool = typer.Option(True, "--torch/--no-torch",
                                              help="Include PyTorch eager cached decode."),
          flavour: str = typer.Option("ort", help="Graphs the ONNX Runtime runs: ort (contrib "
                                      "ops, the default) or portable."),
          peer: Optional[str] = typer.Option(None, help="ortgenai: also time ONNX Runtime "
                                             "GenAI's model of the P = 1 baseline's weights "
                                             "(needs stagcompile\\[peer]; batch 1)."),
          quant: str = typer.Option("", help="Also time bundles with quantized weights: int8 "
                                    "and/or int4, comma-separated (with --peer ortgenai also "
                                    "its model at that precision)."),
          qkv_table: QkvTable = typer.Option(QkvTable.auto, help="The bundles' first-layer "
                                             "Q|K|V table (see `export --help`)."),
          huge_pages: bool = typer.Option(True, help=HUGE_PAGES_HELP + " ONNX Runtime GenAI "
                                          "keeps its own pages."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON."),
          plot: Optional[Path] = typer.Option(None, help="Write a bar chart (PNG).")):
    """Staggered vs sequential vs a P = 1 baseline vs PyTorch eager, side by side."""
    from stagcompile.bench import run_bench
    from stagcompile.bench_report import plot as plot_png
    from stagcompile.bench_report import print_report, write_json
    res = run_bench(checkpoint, preset, _ints("--batch", batch), _ints("--context", context),
                    [w.strip() for w in window.split(",") if w.strip()], bounded_window, backend,
                    iters, rounds, warmup, spinning, torch_baseline, flavour=flavour, peer=peer,
                    quant=[q.strip() for q in quant.split(",") if q.strip()],
                    qkv_table=qkv_table.value, huge_pages=huge_pages)
    print_report(res)
    if json_out:
        write_json(res, json_out)
    if plot:
        plot_png(res, plot)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
