"""`stagcompile bench`: where the decode time goes, measured side by side in one process.

For every (batch, context, cross window) cell it measures per-token decode latency (median, p10,
p90) and prefill throughput of:

    staggered   the StagFormer bundle, all stacks of a step at once, every thread split tried
    sequential  the same graphs one after another, 1 or all intra-op threads
    baseline    a P = 1 model of the same total depth and width, compiled by stagcompile,
                1 or all intra-op threads
    torch       the PyTorch reference's cached decode (eager), 1 or all threads
    stack k     each stack of the staggered bundle alone: the ideal staggered step is the
                slowest of them, efficiency = ideal / measured staggered step

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


def _ort_runners(bundle_dir: Path, prompt: np.ndarray, variant: str, n_cores: int,
                 spinning: bool, stacks_alone: bool) -> list[Runner]:
    from stagcompile.runtime.bundle import Bundle
    from stagcompile.runtime.generator import Generator
    from stagcompile.runtime.ort_backend import OrtBackend

    bundle = Bundle.load(bundle_dir, verify=False)
    p = bundle.num_stacks
    out = []

    def make(label, kind, schedule, threads):
        gen = Generator(bundle, OrtBackend(bundle, list(threads), spinning), schedule)
        ctx = prompt.shape[1]
        tok = np.zeros(prompt.shape[0], np.int64)
        r = Runner(label, kind, tuple(threads), prefill=lambda: gen.prefill(prompt),
                   step=lambda: gen.step(tok), seek=lambda: gen.scheduler.seek(ctx))
        r.generator = gen
        return r

    seq_threads = sorted({1, n_cores})
    kind = "baseline" if variant == "baseline" else "sequential"
    for t in seq_threads:
        out.append(make(f"{kind} {t}t", kind, "sequential", (t,) * p))
    if p > 1:
        for split in thread_splits(p, n_cores):
            out.append(make("staggered " + "+".join(map(str, split)), "staggered", "staggered",
                            split))
    if stacks_alone and p > 1:
        alone = make("stacks alone 1t", "stack-source", "sequential", (1,) * p)
        backend = alone.generator.scheduler.backend
        for k in range(p):
            def one(k=k):
                backend.set_step(np.zeros(prompt.shape[0], np.int64), alone.generator.scheduler.pos)
                backend.launch(k, alone.generator.scheduler.pos % 2)
            out.append(Runner(f"stack {k + 1} alone 1t", "stack", (1,), prefill=alone.prefill,
                              step=one, seek=alone.seek))
    return out


def _torch_runners(checkpoint_dir: Path, prompt: np.ndarray, n_cores: int) -> list[Runner]:
    import torch

    from stagcompile import checkpoint
    from stagcompile.generate import CachedDecoder

    model = checkpoint.load(checkpoint_dir)
    ids = torch.from_numpy(prompt)
    tok = torch.zeros(prompt.shape[0], dtype=torch.int64)
    out = []
    for t in sorted({1, n_cores}):
        dec = CachedDecoder(model, prompt.shape[0])

        def prefill(dec=dec):
            dec.pos.zero_()
            dec.pending = [None] * model.cfg.num_stacks
            dec.prefill(ids)

        def seek(dec=dec):
            dec.pos.fill_(prompt.shape[1])

        out.append(Runner(f"torch eager {t}t", "torch", (t,), prefill=prefill,
                          step=lambda dec=dec: dec.step(tok), seek=seek,
                          before=lambda t=t: torch.set_num_threads(t)))
    return out


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
                                  shared_weights=False, cross_window=None))
    base.reset_parameters(seed)
    out["baseline"] = ck.save(base, work / "ckpt-baseline")
    return out


def run_bench(checkpoint: Path | None = None, preset_name: str | None = None,
              batches=(1, 8), contexts=(128, 1024), windows=("unbounded", "bounded"),
              bounded: int = 32, backend: str = "ort", iters: int = 20, rounds: int = 5,
              warmup: int = 3, spinning: bool = False, include_torch: bool = True,
              work_dir: Path | None = None, show_progress: bool = True) -> dict:
    from stagcompile.bench_report import summarise
    from stagcompile.export import export_bundle
    from stagcompile.progress import progress

    if (checkpoint is None) == (preset_name is None):
        raise StagError("give a CHECKPOINT or --preset NAME (not both)")
    if backend != "ort":
        raise StagError(f"--backend {backend}: this build measures ONNX Runtime; the TensorRT "
                        "path is scripts/gpu_check.sh on a GPU machine")
    for name, vals in (("--batch", batches), ("--context", contexts)):
        if not vals or min(vals) < 1:
            raise StagError(f"{name} {list(vals)}: give values >= 1")
    bad = set(windows) - {"unbounded", "bounded"}
    if bad:
        raise StagError(f"--window {sorted(bad)}: expected unbounded and/or bounded")
    n_cores = cores()
    tmp = tempfile.TemporaryDirectory(prefix="stagbench-") if work_dir is None else None
    work = Path(tmp.name if tmp else work_dir)
    rows, margin = [], warmup + iters + 2
    try:
        with progress(show_progress) as bar:
            task = bar.add_task("compile", total=len(windows) * len(contexts) + len(contexts))
            ckpts = prepare_checkpoints(checkpoint, preset_name, work, list(windows), bounded)
            bundles = {}
            for variant, ck in ckpts.items():
                for ctx in contexts:
                    bar.update(task, description=f"export {variant}, context {ctx}")
                    out = work / f"bundle-{variant}-{ctx}"
                    export_bundle(ck, out, "portable", "fp32", ctx + margin,
                                  max(batches), force=True, show_progress=False)
                    bundles[variant, ctx] = out
                    bar.advance(task)
            cells = list(itertools.product(batches, contexts, windows))
            for b, ctx, w in cells:
                prompt = np.random.default_rng(0).integers(0, 100, (b, ctx)).astype(np.int64)
                runners = (_ort_runners(bundles[w, ctx], prompt, w, n_cores, spinning, True)
                           + _ort_runners(bundles["baseline", ctx], prompt, "baseline", n_cores,
                                          spinning, False))
                if include_torch:
                    runners += _torch_runners(ckpts[w], prompt, n_cores)
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
            "warmup": warmup, "spinning": spinning, "bounded_window": bounded}
    return summarise(meta, rows)
