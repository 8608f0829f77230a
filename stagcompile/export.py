"""`stagcompile export`: checkpoint -> bundle (graphs, manifest, golden trace, runtime).

    bundle/manifest.json           config, I/O table per stack, caches, schedule, versions, checksums
    bundle/graphs/<flavour>/stackK.onnx (+ .onnx.data)     one graph per stack and flavour
    bundle/validation/trace.npz    golden trace of the fp32 reference (see stagcompile.golden)
    bundle/runtime/                the generated runtime (see stagcompile.codegen)
    bundle/tokenizer.json          when the checkpoint has one

With `quant` (int8 | int4) every graph's constant MatMul weights are quantized by ONNX Runtime's
quantizer (stagcompile.quantize) before they are written; the manifest's `quant` section says how.

The bundle is assembled in a temporary folder and renamed at the end (stagcompile.atomic); it never
replaces its own checkpoint, a folder holding it, or a folder that is not a bundle. The checkpoint's
weights must be finite and its tokenizer must load and fit the model's vocabulary.
"""

from __future__ import annotations

import copy
import platform
import shutil
from pathlib import Path

import numpy as np

from stagcompile import __version__
from stagcompile.atomic import atomic_dir, check_target
from stagcompile.errors import StagError
from stagcompile.progress import progress
from stagcompile.runtime.bundle import (FORMAT, MANIFEST_VERSION, BundleError, sha256,
                                        write_manifest)
from stagcompile.runtime.generator import load_tokenizer

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FLAVOUR_CHOICES = {"all": ("portable", "plugin", "ort"), "portable": ("portable",),
                   "plugin": ("plugin",), "ort": ("ort",), "both": ("portable", "plugin")}
TRACED = ("portable", "plugin")       # traced from the reference; `ort` is built from weights


def check_options(flavour: str, dtype: str, max_batch: int, max_seq_len: int | None) -> None:
    if flavour not in FLAVOUR_CHOICES:
        raise StagError(f"--flavour {flavour}: expected one of {', '.join(FLAVOUR_CHOICES)}")
    if dtype not in DTYPES:
        raise StagError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if max_batch < 1:
        raise StagError(f"--max-batch {max_batch}: must be >= 1")
    if max_seq_len is not None and max_seq_len < 2:
        raise StagError(f"--max-seq-len {max_seq_len}: must be >= 2")


def _versions() -> dict:
    import onnx
    import torch
    out = {"stagcompile": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
           "python": platform.python_version()}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def _shared_weights(model) -> dict:
    per_stack = model.stack_parameter_names()
    counts: dict[str, int] = {}
    for names in per_stack.values():
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    shared = sorted(n for n, c in counts.items() if c > 1)
    return {"shared_weights": model.cfg.shared_weights,
            "note": ("every stack reuses stack 1's self-attention, MLP and norm weights (each "
                     "stack graph holds its own copy); cross-attention, null slot and memory "
                     "norm are per stack") if model.cfg.shared_weights else
                    "tensors listed under shared appear in more than one stack graph",
            "per_stack": {str(k + 1): v for k, v in per_stack.items()},
            "shared": shared}


def ort_unsupported(cfg, dtype: str) -> str | None:
    """Why the ort flavour cannot express this model (None when it can)."""
    if dtype == "bfloat16":
        return ("ONNX Runtime's CPU provider has no bfloat16 kernels; export fp32 or fp16 for "
                "the ort flavour")
    if cfg.head_dim % 16:
        return (f"ONNX Runtime's GroupQueryAttention needs a head_dim that is a multiple of 16, "
                f"this model has {cfg.head_dim}; the portable graphs serve ONNX Runtime instead")
    return None


QKV_TABLE_CHOICES = ("auto", "on", "off")


def check_qkv_table(choice: str, quant: str | None) -> None:
    """One-line errors for a `--qkv-table` the export cannot honour."""
    if choice not in QKV_TABLE_CHOICES:
        raise StagError(f"--qkv-table {choice!r}: expected one of {', '.join(QKV_TABLE_CHOICES)}")
    if choice == "on" and quant is not None:
        raise StagError(f"--qkv-table on with --quant {quant}: the table is a full-precision "
                        "copy of the first projection for every token; use it on unquantized "
                        "bundles (auto leaves it off with --quant)")


def use_qkv_table(cfg, choice: str, quant: str | None) -> bool:
    """Resolve `--qkv-table auto|on|off` for this model (auto: ort_stack.qkv_table_auto)."""
    from graphs.ort_stack import qkv_table_auto

    check_qkv_table(choice, quant)
    return qkv_table_auto(cfg, quant) if choice == "auto" else choice == "on"


def qkv_table_note(cfg, on: bool, dtype: str) -> str:
    """The manifest's account of the first layer's Q|K|V path."""
    if not on:
        return "MatMul of RMSNorm(E[t]) (the d x (H + 2 Hkv) D weight read every step)"
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    mib = cfg.vocab_size * width * np.dtype(dtype).itemsize / 2 ** 20
    return (f"Gather from a [{cfg.vocab_size}, {width}] table of RMSNorm(E[v]) @ [Wq|Wk|Wv] "
            f"for every token v, precomputed at export ({mib:.1f} MiB per stack; one row read "
            "per token)")


def ort_manifest(cfg, ios, qkv_table: bool = False, dtype: str = "float32") -> dict:
    """What the ort flavour's graphs do differently, and why (manifest section `ort`)."""
    from graphs.io import ort_capacity
    from graphs.ort_stack import OPSET, rope_mode

    def cache(window):
        return {"capacity": ort_capacity(window, cfg.max_seq_len), "window": window,
                "layout": ("GroupQueryAttention sliding-window cache: the latest positions "
                           "contiguous from row 0, compacted by the op" if window else
                           "linear: position p in row p")}

    return {
        "opset": OPSET,
        "io": [io.to_dict() for io in ios],
        "caches": {"self": cache(cfg.self_window), "cross": cache(cfg.cross_window),
                   "updated": "in place by the graph that owns them (present.* outputs alias "
                              "their inputs); the runtime commits nothing",
                   "unbounded_length": cfg.unbounded_length},
        "attention": "com.microsoft GroupQueryAttention (self and cross), "
                     "local_window_size = window for bounded windows",
        "rope": ("RotaryEmbedding with tables computed per step from pos (every attention is "
                 "windowed, so positions may pass max_seq_len)" if rope_mode(cfg) == "step" else
                 "inside GroupQueryAttention with cos/sin tables of max_seq_len positions"),
        "logits": "last position only, [batch, 1, vocab]",
        "first_qkv": qkv_table_note(cfg, qkv_table, dtype),
        "qkv_table": qkv_table,
    }


def export_bundle(checkpoint_dir: Path, output: Path, flavour: str = "all", dtype: str = "fp32",
                  max_seq_len: int | None = None, max_batch: int = 8, force: bool = False,
                  show_progress: bool = True, golden_batch: int = 2, quant: str | None = None,
                  block_size: int = 32, quant_embedding: bool = True,
                  qkv_table: str = "auto") -> Path:
    from stagcompile.quantize import QDQ_OPSET, check_quant, manifest_section, quantize

    check_options(flavour, dtype, max_batch, max_seq_len)
    check_quant(quant, block_size, dtype)
    check_qkv_table(qkv_table, quant)
    import torch

    from graphs.io import stack_io
    from stagcompile import checkpoint, golden
    from stagcompile.codegen import write_runtime
    from stagcompile.onnx_export import (OPSET, check, portable, save, save_ort_stack,
                                         trace_stack)

    check_target(output, force, "bundle", [checkpoint_dir])
    model = checkpoint.load(checkpoint_dir, dtype=torch.float32)
    tok = checkpoint.tokenizer_path(checkpoint_dir)
    if tok is not None:
        try:
            load_tokenizer(tok, model.cfg.vocab_size)     # it loads, and fits the vocabulary
        except BundleError as exc:
            raise StagError(str(exc)) from None
    if max_seq_len is not None:
        model.cfg = model.cfg.replace(max_seq_len=max_seq_len)
    cfg, flavours, dt = model.cfg, FLAVOUR_CHOICES[flavour], DTYPES[dtype]
    ort_skipped = ort_unsupported(cfg, dt) if "ort" in flavours else None
    if ort_skipped and flavour == "ort":
        raise StagError(f"--flavour ort: {ort_skipped}")
    if ort_skipped:
        flavours = tuple(f for f in flavours if f != "ort")
    table = use_qkv_table(cfg, qkv_table, quant)
    export_model = model if dt == "float32" else copy.deepcopy(model).to(getattr(torch, dt))
    output = Path(output)
    files: list[Path] = []
    graphs: dict[str, list] = {f: [] for f in flavours}
    changed: dict[str, int] = {}

    def quantized(proto, fl: str):
        """`proto` with its weights quantized (when --quant is given)."""
        if quant is None:
            return proto
        proto, n = quantize(proto, quant, block_size, fl, quant_embedding)
        changed[fl] = changed.get(fl, 0) + n
        return proto

    with atomic_dir(output, force, "bundle", [checkpoint_dir]) as tmp, \
            progress(show_progress) as bar:
        task = bar.add_task("export", total=cfg.num_stacks * len(flavours) + 2)
        ios, ort_ios = [], []
        weights = ({n: t.detach().float().numpy() for n, t in model.state_dict().items()}
                   if "ort" in flavours else None)
        for k in range(cfg.num_stacks):
            io = stack_io(cfg, k, dt)
            ios.append(io)
            if "ort" in flavours:
                bar.update(task, description=f"build stack {k + 1}/{cfg.num_stacks} (ort)")
                path = tmp / "graphs" / "ort" / f"stack{k + 1}.onnx"
                written, ort_io = save_ort_stack(cfg, weights, k, dt, path,
                                                 lambda p: quantized(p, "ort"), table)
                ort_ios.append(ort_io)
                files += written
                graphs["ort"].append({"stack": k + 1, "file": str(path.relative_to(tmp)),
                                      "bytes": sum(f.stat().st_size for f in written)})
                bar.advance(task)
            if not set(flavours) & set(TRACED):
                continue
            bar.update(task, description=f"trace stack {k + 1}/{cfg.num_stacks} (torch.onnx)")
            proto = trace_stack(export_model, k, dt, max_batch)
            for fl in (f for f in flavours if f in TRACED):
                bar.update(task, description=f"write + check stack {k + 1} ({fl})")
                path = tmp / "graphs" / fl / f"stack{k + 1}.onnx"
                written = save(quantized(portable(proto) if fl == "portable" else proto, fl),
                               path)
                check(path, io)
                files += written
                graphs[fl].append({"stack": k + 1, "file": str(path.relative_to(tmp)),
                                   "bytes": sum(f.stat().st_size for f in written)})
                bar.advance(task)
        if ort_skipped:
            bar.console.print(f"note: no ort graphs: {ort_skipped}", highlight=False)
        bar.update(task, description="golden trace (PyTorch reference)")
        prompt_len = max(2, min(8, cfg.max_seq_len // 4))
        steps = golden.default_steps(cfg)
        if not cfg.unbounded_length:
            steps = min(steps, cfg.max_seq_len - prompt_len)
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (golden_batch, prompt_len))
        records, tokens = golden.record(model, prompt.astype(np.int64), steps)
        (tmp / "validation").mkdir()
        golden.save(tmp / "validation" / "trace.npz", records, prompt, tokens)
        files.append(tmp / "validation" / "trace.npz")
        bar.advance(task)
        bar.update(task, description="runtime")
        if tok is not None:
            shutil.copyfile(tok, tmp / "tokenizer.json")
            files.append(tmp / "tokenizer.json")
        files += write_runtime(tmp)
        manifest = {
            "format": FORMAT, "manifest_version": MANIFEST_VERSION,
            "config": cfg.to_dict(), "dtype": dt, "max_batch": max_batch,
            "opset": QDQ_OPSET if quant == "int4" and set(flavours) & set(TRACED) else OPSET,
            "graphs": graphs,
            "io": [io.to_dict() for io in ios],
            "caches": {"self": {"capacity": cfg.self_capacity(), "window": cfg.self_window},
                       "cross": {"capacity": cfg.cross_capacity(), "window": cfg.cross_window},
                       "layout": "[batch, kv_heads, capacity, head_dim]; position p in slot p mod capacity",
                       "unbounded_length": cfg.unbounded_length},
            "schedule": {"prefill": "stacks in order on the prompt",
                         "decode": "staggered: all stacks of a step at once",
                         "edges": [{"producer": k, "consumer": k + 1,
                                    "outputs": "cross_out.*, cross_null.*", "inputs": "cross_in.*"}
                                   for k in range(1, cfg.num_stacks)]},
            "attention": {"op": "stagformer::BoundedWindowAttention",
                          "self_window": cfg.self_window or 0,
                          "cross_window": cfg.cross_window or 0, "scale": cfg.head_dim ** -0.5},
            "weights": _shared_weights(model),
            "quant": (manifest_section(quant, block_size, flavours, changed, quant_embedding)
                      if quant else None),
            "ort": (ort_manifest(cfg, ort_ios, table, dt) if ort_ios
                    else {"skipped": ort_skipped} if ort_skipped else None),
            "validation": {"trace": "validation/trace.npz", "batch": golden_batch,
                           "prompt_len": prompt_len, "steps": steps},
            "tokenizer": "tokenizer.json" if tok is not None else None,
            "engines": None,
            "versions": _versions(),
            "files": {str(f.relative_to(tmp)): sha256(f) for f in files},
        }
        write_manifest(tmp, manifest)
        bar.update(task, description="done")
        bar.advance(task)
    return output
