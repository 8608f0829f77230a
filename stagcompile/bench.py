"""`stagcompile bench`: where the decode time goes, measured side by side in one process.

For every (batch, context, cross window) cell it measures per-token decode latency (median, p10,
p90) and prefill throughput of:

    staggered   the StagFormer bundle, all stacks of a step at once, every thread split tried
    sequential  the same graphs one after another, 1 or all intra-op threads
    baseline    a P = 1 model of the same total depth and width, compiled by stagcompile,
                1 or all intra-op threads
    torch       the PyTorch reference's cached decode (eager), 1 or all threads
    peer        with `--peer ortgenai`: ONNX Runtime GenAI's own model of the baseline's weights
                (its model builder, fp32), 1 or all threads, batch 1 (`stagcompile.peer`)
    stack k     each stack of the staggered bundle alone: the ideal staggered step is the
                slowest of them, efficiency = ideal / measured staggered step
    ... int4    with `--quant int8,int4`: the same bundles exported with weight-only quantized
                weights (`export --quant`): staggered (every split) and the P = 1 baseline, and
                with `--peer ortgenai` ONNX Runtime GenAI's model at that precision (its
                builder's `-p int4`, same weights, same quantizer defaults; with tied
                embeddings that builder quantizes the embedding too, like ours)

Runs are warmed up and interleaved (round r runs every configuration before round r + 1), so
drift on a shared machine hits all of them alike; each configuration gets the cores at its best
thread count. Decode steps continue from the prefilled context and seek back to it between rounds,
so every step sees the stated context. Ratios, targets and the thread-scaling table are made by
`stagcompile.bench_report`.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from stagcompile.errors import StagError


@dataclass
class Runner:
    label: str
    kind: str                       # staggered | sequential | baseline | torch | stack
    threads: tuple
    prefill: Callable[[], None]     # (re)fill the context
    step: Callable[[], None]        # one decode step
    seek: Callable[[], None]        # back to the context
    before: Callable[[], None] = lambda: None
    steps_s: list = field(default_factory=list)
    prefill_s: float = 0.0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def thread_splits(n_stacks: int, n_cores: int) -> list[tuple]:
    """Per-stack intra-op thread counts to try for the staggered schedule: every split whose
    total fits the cores, plus all cores for every stack."""
    splits = [s for s in itertools.product(range(1, n_cores + 1), repeat=n_stacks)
              if sum(s) <= max(n_cores, n_stacks)]
    full = (n_cores,) * n_stacks
    return sorted(set(splits + [full]))


def _runtime_runners(bundle_dir: Path, prompt: np.ndarray, variant: str, backend: str,
                     n_cores: int, spinning: bool, stacks_alone: bool,
                     flavour: str | None = None, tag: str = "",
                     huge_pages: bool = True) -> list[Runner]:
    """Runners over one bundle: every schedule and (ONNX Runtime) thread setting worth trying.
    A `tag` (a quantized bundle's precision) is appended to labels and kinds; a tagged
    StagFormer bundle runs the staggered schedule only."""
    from stagcompile.runtime.bundle import Bundle
    from stagcompile.runtime.generator import Generator, make_backend

    bundle = Bundle.load(bundle_dir, verify=False)
    p, ctx = bundle.num_stacks, prompt.shape[1]
    tok = np.zeros(prompt.shape[0], np.int64)
    out = []

    def make(label, kind, schedule, threads):
        gen = Generator(bundle, make_backend(bundle, backend, schedule, list(threads), spinning,
                                             flavour if backend == "ort" else None, huge_pages),
                        schedule)
        label, kind = (f"{label} {tag}", f"{kind} {tag}") if tag else (label, kind)
        r = Runner(label, kind, tuple(threads), prefill=lambda: gen.prefill(prompt),
                   step=lambda: gen.step(tok), seek=lambda: gen.scheduler.seek(ctx))
        r.generator = gen
        return r

    kind = "baseline" if variant == "baseline" else "sequential"
    if backend == "ort":
        seq = [(t,) * p for t in sorted({1, n_cores})]
        stag = thread_splits(p, n_cores) if p > 1 else []
    else:
        seq, stag = [(1,) * p], ([(1,) * p] if p > 1 else [])
    if tag and p > 1:
        seq = []
    for threads in seq:
        suffix = f" {threads[0]}t" if backend == "ort" else ""
        out.append(make(f"{kind}{suffix}", kind, "sequential", threads))
    for split in stag:
        suffix = " " + "+".join(map(str, split)) if backend == "ort" else ""
        out.append(make(f"staggered{suffix}", "staggered", "staggered", split))
    if stacks_alone and p > 1:
        alone = make("stacks alone", "stack-source", "sequential", (1,) * p)
        sched = alone.generator.scheduler
        for k in range(p):
            def one(k=k):
                sched.backend.set_step(tok, sched.pos)
                sched.backend.launch(k, sched.pos % 2)
                sched.backend.sync()
            out.append(Runner(f"stack {k + 1} alone", "stack", (1,), prefill=alone.prefill,
                              step=one, seek=alone.seek))
    return out


def _peer_runners(folder: Path, prompt: np.ndarray, n_cores: int, spinning: bool,
                  max_new: int, tag: str = "") -> list[Runner]:
    from stagcompile.peer import PeerSession
    out = []
    for t in sorted({1, n_cores}):
        ps = PeerSession(folder, prompt, t, spinning, max_new)
        out.append(Runner(f"ortgenai{' ' + tag if tag else ''} {t}t",
                          f"peer {tag}" if tag else "peer", (t,), prefill=ps.prefill,
                          step=ps.step, seek=ps.restart))
    return out


def _prefill_from_start(dec, ids) -> None:
    """Restart a CachedDecoder at position 0 and prefill `ids` in the runtime's chunks."""
    from stagcompile.runtime.scheduler import PREFILL_CHUNK
    dec.pos.zero_()
    dec.pending = [None] * dec.cfg.num_stacks
    for start in range(0, ids.shape[1], PREFILL_CHUNK):
        dec.prefill(ids[:, start:start + PREFILL_CHUNK])


def _torch_runners(checkpoint_dir: Path, prompt: np.ndarray, n_cores: int, capacity: int,
                   device: str = "cpu") -> list[Runner]:
    """The reference's cached decode, with the same cache capacity as the compiled bundle."""
    import torch

    from stagcompile import checkpoint
    from stagcompile.generate import CachedDecoder

    model = checkpoint.load(checkpoint_dir)
    model.cfg = model.cfg.replace(max_seq_len=capacity)
    if device != "cpu":
        return _torch_gpu_runner(model, prompt, device)
    ids = torch.from_numpy(prompt)
    tok = torch.zeros(prompt.shape[0], dtype=torch.int64)
    out = []
    for t in sorted({1, n_cores}):
        dec = CachedDecoder(model, prompt.shape[0])

        def prefill(dec=dec):
            _prefill_from_start(dec, ids)

        def seek(dec=dec):
            dec.pos.fill_(prompt.shape[1])

        out.append(Runner(f"torch eager {t}t", "torch", (t,), prefill=prefill,
                          step=lambda dec=dec: dec.step(tok), seek=seek,
                          before=lambda t=t: torch.set_num_threads(t)))
    return out


def _torch_gpu_runner(model, prompt: np.ndarray, device: str) -> list[Runner]:
    """PyTorch eager cached decode on the GPU (the comparison for --backend trt)."""
    import torch

    from stagcompile.generate import CachedDecoder

    model = model.to(device)
    dec = CachedDecoder(model, prompt.shape[0])
    dec.self_cache = [[(k.to(device), v.to(device)) for k, v in st] for st in dec.self_cache]
    dec.cross_cache = [None if c is None else [(k.to(device), v.to(device)) for k, v in c]
                       for c in dec.cross_cache]
    ids = torch.from_numpy(prompt).to(device)
    tok = torch.zeros(prompt.shape[0], dtype=torch.int64, device=device)

    def prefill():
        _prefill_from_start(dec, ids)
        torch.cuda.synchronize()

    def step():
        dec.step(tok)
        torch.cuda.synchronize()

    def seek():
        dec.pos.fill_(prompt.shape[1])

    return [Runner("torch eager cuda", "torch", (1,), prefill=prefill, step=step, seek=seek)]


def measure(runners: list[Runner], iters: int, rounds: int, warmup: int, bar=None, task=None):
    """Prefill each runner (timed), then `rounds` interleaved rounds of `iters` timed steps."""
    for r in runners:
        r.before()
        t0 = time.perf_counter()
        r.prefill()
        r.prefill_s = time.perf_counter() - t0
        for _ in range(warmup):
            r.step()
        r.seek()
        if bar is not None:
            bar.advance(task)
    for _ in range(rounds):
        for r in runners:
            r.before()
            r.seek()
            for _ in range(iters):
                t0 = time.perf_counter()
                r.step()
                r.steps_s.append(time.perf_counter() - t0)
            if bar is not None:
                bar.advance(task)


def prepare_checkpoints(checkpoint: Path | None, preset_name: str | None, work: Path,
                        windows: list[str], bounded: int, seed: int = 0) -> dict[str, Path]:
    """The checkpoints to compile: the model (unbounded / bounded cross window) and the P = 1
    baseline of the same total depth and width (random weights: speed does not depend on them)."""
    import torch

    from stagcompile import checkpoint as ck
    from stagcompile.config import preset
    from stagcompile.model import StagFormer

    if checkpoint is not None:
        model = ck.load(checkpoint)
    else:
        torch.manual_seed(seed)
        model = StagFormer(preset(preset_name))
    cfg = model.cfg
    if cfg.num_stacks < 2:
        raise StagError("bench needs a StagFormer with num_stacks >= 2 (it compares against a "
                        "P = 1 baseline it builds itself)")
    out = {}
    for w in windows:
        m = StagFormer(cfg.replace(cross_window=None if w == "unbounded" else bounded))
        m.load_state_dict(model.state_dict())
        out[w] = ck.save(m, work / f"ckpt-{w}")
    base = StagFormer(cfg.replace(num_stacks=1, layers_per_stack=cfg.num_layers,
                                  shared_weights=False, cross_window=None, cross_gate=False))
    base.reset_parameters(seed)
    out["baseline"] = ck.save(base, work / "ckpt-baseline")
    return out


def run_bench(checkpoint: Path | None = None, preset_name: str | None = None,
              batches=(1, 8), contexts=(128, 1024), windows=("unbounded", "bounded"),
              bounded: int = 32, backend: str = "ort", iters: int = 20, rounds: int = 5,
              warmup: int = 3, spinning: bool = False, include_torch: bool = True,
              work_dir: Path | None = None, show_progress: bool = True,
              flavour: str = "ort", peer: str | None = None, quant=(),
              qkv_table: str = "auto", huge_pages: bool = True) -> dict:
    from stagcompile.bench_report import summarise
    from stagcompile.config import load_config
    from stagcompile.export import export_bundle, use_qkv_table
    from stagcompile.progress import progress

    if (checkpoint is None) == (preset_name is None):
        raise StagError("give a CHECKPOINT or --preset NAME (not both)")
    if backend not in ("ort", "trt"):
        raise StagError(f"--backend {backend}: expected ort or trt")
    if flavour not in ("ort", "portable"):
        raise StagError(f"--flavour {flavour}: expected ort or portable")
    if peer not in (None, "ortgenai"):
        raise StagError(f"--peer {peer}: expected ortgenai")
    quant = list(dict.fromkeys(quant))
    if set(quant) - {"int8", "int4"}:
        raise StagError(f"--quant {','.join(quant)}: expected int8 and/or int4")
    if quant and backend != "ort":
        raise StagError("--quant: measured on the ONNX Runtime backend only (build a quantized "
                        "bundle's TensorRT engines with `stagcompile build`)")
    if peer:
        from stagcompile.peer import check_available
        check_available()
    if backend == "trt":
        from stagcompile.compile import can_build
        ok, why = can_build()
        if not ok:
            raise StagError(f"--backend trt: {why}")
    for name, vals in (("--batch", batches), ("--context", contexts)):
        if not vals or min(vals) < 1:
            raise StagError(f"{name} {list(vals)}: give values >= 1")
    bad = set(windows) - {"unbounded", "bounded"}
    if bad:
        raise StagError(f"--window {sorted(bad)}: expected unbounded and/or bounded")
    n_cores = cores()
    tmp = tempfile.TemporaryDirectory(prefix="stagbench-") if work_dir is None else None
    work = Path(tmp.name if tmp else work_dir)
    rows, margin, peer_check = [], warmup + iters + 2, {}
    try:
        with progress(show_progress) as bar:
            task = bar.add_task("compile", total=(len(windows) + 1) * len(contexts)
                                * (1 + len(quant)))
            ckpts = prepare_checkpoints(checkpoint, preset_name, work, list(windows), bounded)
            bundles = {}
            for (variant, ck), q in itertools.product(ckpts.items(), [None] + quant):
                for ctx in contexts:
                    bar.update(task, description=f"export {variant}, context {ctx} {q or ''}")
                    out = work / f"bundle-{variant}-{ctx}-{q or 'fp32'}"
                    export_bundle(ck, out, "both" if backend == "trt" else flavour, "fp32",
                                  ctx + margin, max(batches), force=True, show_progress=False,
                                  quant=q, qkv_table=qkv_table)
                    if backend == "trt":
                        from stagcompile.build import build_engines
                        build_engines(out, max_prefill=ctx, show_progress=False)
                    bundles[variant, ctx, q] = out
                    bar.advance(task)
            peer_dirs, peer_check = {}, {}
            if peer:
                from stagcompile.peer import build_peer, same_greedy_tokens
                bar.update(task, description="ONNX Runtime GenAI's builder (peer)")
                peer_dirs = {q: build_peer(ckpts["baseline"], work / "peer", q or "fp32")
                             for q in [None] + quant}
            vocab = load_config(ckpts["baseline"]).vocab_size
            table = use_qkv_table(load_config(ckpts["baseline"]), qkv_table, None)
            for q, folder in peer_dirs.items():
                ours = bundles["baseline", contexts[0], q]
                peer_check[q or "fp32"] = same_greedy_tokens(folder, ours, vocab)
            cells = list(itertools.product(batches, contexts, windows))
            for b, ctx, w in cells:
                prompt = np.random.default_rng(0).integers(0, vocab, (b, ctx)).astype(np.int64)

                def runners_of(variant: str, q: str | None, alone: bool = False) -> list[Runner]:
                    return _runtime_runners(bundles[variant, ctx, q], prompt, variant, backend,
                                            n_cores, spinning, alone, flavour, q or "",
                                            huge_pages)

                runners = runners_of(w, None, True) + runners_of("baseline", None)
                for q in quant:
                    runners += runners_of(w, q) + runners_of("baseline", q)
                for q, folder in (peer_dirs.items() if b == 1 else ()):
                    runners += _peer_runners(folder, prompt, n_cores, spinning, margin, q or "")
                if include_torch:
                    runners += _torch_runners(ckpts[w], prompt, n_cores, ctx + margin,
                                              "cuda" if backend == "trt" else "cpu")
                task = bar.add_task(f"batch {b}, context {ctx}, {w} cross window",
                                    total=len(runners) * (rounds + 1))
                measure(runners, iters, rounds, warmup, bar, task)
                for r in runners:
                    s = np.array(r.steps_s) * 1e3
                    rows.append({"batch": b, "context": ctx, "window": w, "label": r.label,
                                 "kind": r.kind, "threads": list(r.threads),
                                 "median_ms": float(np.median(s)),
                                 "p10_ms": float(np.percentile(s, 10)),
                                 "p90_ms": float(np.percentile(s, 90)),
                                 "prefill_tok_s": b * ctx / r.prefill_s if r.kind != "stack" else None,
                                 "samples": len(s)})
                for r in runners:
                    gen = getattr(r, "generator", None)
                    if gen is not None:
                        gen.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta = {"checkpoint": str(checkpoint) if checkpoint else None, "preset": preset_name,
            "backend": backend, "cores": n_cores, "iters": iters, "rounds": rounds,
            "warmup": warmup, "spinning": spinning, "bounded_window": bounded,
            "flavour": flavour if backend == "ort" else None, "peer": peer,
            "peer_tokens": peer_check.get("fp32"), "quant": quant,
            "peer_tokens_quant": {q: v for q, v in peer_check.items() if q != "fp32"},
            "qkv_table": (f"{'on' if table else 'off'} ({qkv_table})"
                          if flavour == "ort" and backend == "ort" else None),
            "huge_pages": huge_pages if backend == "ort" else None}
    return summarise(meta, rows)
