"""`stagcompile compile`: checkpoint -> validated, runnable bundle in one command.

export (graphs, manifest, golden trace, runtime) -> build (TensorRT engines, where TensorRT and a
GPU exist; otherwise it says why and continues) -> validate -> a summary of what was produced and
how to run it.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from stagcompile.errors import StagError
from stagcompile.progress import table_console


def can_build() -> tuple[bool, str]:
    """Whether `stagcompile build` can produce runnable engines on this machine, and why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, ("TensorRT is not installed (pip install tensorrt on an x86_64 machine with "
                       "an NVIDIA GPU, or JetPack's TensorRT on Jetson)")
    try:
        from stagcompile.runtime.device import device_count
        if device_count() < 1:
            return False, "no CUDA device is visible"
    except ImportError:
        return False, "cuda-python is not installed (pip install cuda-python)"
    return True, ""


def compile_checkpoint(checkpoint: Path, output: Path, flavour: str = "all", dtype: str = "fp32",
                       max_seq_len: int | None = None, max_batch: int = 8, force: bool = False,
                       build: bool = True, show_progress: bool = True,
                       qkv_table: str = "auto") -> dict:
    from stagcompile.export import export_bundle
    from stagcompile.validate import print_report, validate_bundle

    con = Console(stderr=True)
    con.print(f"[bold]1/3 export[/] {checkpoint} -> {output}")
    export_bundle(checkpoint, output, flavour, dtype, max_seq_len, max_batch, force, show_progress,
                  qkv_table=qkv_table)
    built, why = False, "skipped (--no-build)"
    if build:
        ok, why = can_build()
        if ok:
            from stagcompile.build import build_engines
            con.print("[bold]2/3 build[/] TensorRT engines")
            build_engines(output, show_progress=show_progress)
            built = True
        else:
            con.print(f"[bold]2/3 build[/] skipped: {why}; the bundle runs on ONNX Runtime, and "
                      f"`stagcompile build {output}` on the target GPU adds engines")
    con.print("[bold]3/3 validate[/] against the PyTorch reference")
    report = validate_bundle(output, show_progress=show_progress)
    print_report(report)
    verdict = ("passed" if report.passed else "FAILED" if report.ran
               else "not run here (no backend for this bundle; see above)")
    summary = _summary(Path(output), built, why, verdict)
    _print_summary(summary)
    if report.ran and not report.passed:
        raise StagError(f"{output}: validation failed (see validation/report.json)")
    return summary


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _summary(root: Path, built: bool, why: str, verdict: str) -> dict:
    from stagcompile.runtime.bundle import Bundle
    b = Bundle.load(root, verify=False)
    graphs = {fl: _size(root.glob(f"graphs/{fl}/*")) for fl in b.flavours}
    engines = _size(root.glob("engines/*.plan"))
    run = f"python {root}/runtime/run.py " + ("--prompt 'Once upon a time'" if b.tokenizer
                                              else "--ids 1,2,3")
    if b.dtype == "bfloat16":
        run += " --backend trt   # bf16: TensorRT engines (stagcompile build on the GPU)"
    return {"bundle": str(root), "stacks": b.num_stacks, "dtype": b.dtype, "graphs": graphs,
            "engines": engines if built else None, "build": "built" if built else why,
            "validation": verdict, "run": run}


def _print_summary(s: dict) -> None:
    t = Table(title="stagcompile compile: summary", show_header=False)
    t.add_row("bundle", s["bundle"])
    t.add_row("stacks / dtype", f"{s['stacks']} / {s['dtype']}")
    for fl, size in s["graphs"].items():
        t.add_row(f"graphs ({fl})", f"{s['stacks']} files, {size / 2**20:.2f} MiB")
    t.add_row("engines", f"{s['engines'] / 2**20:.2f} MiB" if s["engines"] is not None
              else s["build"])
    t.add_row("validation", s["validation"])
    con = table_console()
    con.print(t)
    con.print(f"run it: {s['run']}", soft_wrap=True, highlight=False)
