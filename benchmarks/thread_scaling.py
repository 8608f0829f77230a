"""CPU thread scaling of the ONNX Runtime staggered runtime: ms per token at 4, 8 and 16 cores.

    python benchmarks/thread_scaling.py [--preset small] [--cores 4 8 16] [--context 128]
                                        [--iters 32] [--rounds 5] [--json F] [--dry-run]

Compiles the model (random weights, unbounded cross window) and the P = 1 baseline of the same
total depth and width (`stagcompile.bench.prepare_checkpoints`, portable fp32 bundles), then for
each core count n runs a fresh process pinned to the first n cores (os.sched_setaffinity, before
any ONNX Runtime thread exists) that measures at batch 1, warmed up and in interleaved rounds
(`stagcompile.bench.measure`), the median ms per token of:

    staggered    every stack at once, n / P intra-op threads per stack
    sequential   the stacks one after another, n threads each
    baseline     the P = 1 model, n threads

Core counts above what this machine has are skipped, and said so. `--dry-run`: the `tiny`
preset at 1 and 2 cores, a few steps (what CPU tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(n: int, model: Path, baseline: Path, context: int, iters: int, rounds: int) -> dict:
    """Median ms per token of each configuration on the first n cores of this process."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    import numpy as np

    from stagcompile.bench import Runner, measure
    from stagcompile.runtime.bundle import Bundle
    from stagcompile.runtime.generator import Generator, make_backend

    bundles = {"model": Bundle.load(model, verify=False), "baseline": Bundle.load(baseline,
                                                                                 verify=False)}
    p = bundles["model"].num_stacks
    prompt = np.random.default_rng(0).integers(0, bundles["model"].config["vocab_size"],
                                               (1, context)).astype(np.int64)
    tok = np.zeros(1, np.int64)
    runners = []
    for label, which, schedule, threads in (
            ("staggered", "model", "staggered", [max(1, n // p)] * p),
            ("sequential", "model", "sequential", [n] * p),
            ("baseline", "baseline", "sequential", [n])):
        bundle = bundles[which]
        gen = Generator(bundle, make_backend(bundle, "ort", schedule, threads), schedule)
        runners.append(Runner(label, label, tuple(threads), prefill=lambda g=gen: g.prefill(prompt),
                              step=lambda g=gen: g.step(tok),
                              seek=lambda g=gen: g.scheduler.seek(context)))
    measure(runners, iters, rounds, warmup=3)
    return {r.label: {"threads": list(r.threads), "median_ms":
                      float(np.median(np.array(r.steps_s) * 1e3))} for r in runners}


def compile_bundles(preset: str, work: Path, context: int, steps: int) -> tuple[Path, Path]:
    from stagcompile.bench import prepare_checkpoints
    from stagcompile.export import export_bundle

    ckpts = prepare_checkpoints(None, preset, work, ["unbounded"], bounded=32)
    out = []
    for name in ("unbounded", "baseline"):
        out.append(export_bundle(ckpts[name], work / f"bundle-{name}", "portable", "fp32",
                                 context + steps + 8, 1, force=True, show_progress=False))
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--cores", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iters", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bundles", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, *args.bundles, args.context, args.iters,
                               args.rounds)))
        return 0
    print("$", shlex.join(["python", "benchmarks/thread_scaling.py", *sys.argv[1:]]), flush=True)
    if args.dry_run:
        args.preset, args.cores, args.context, args.iters, args.rounds = "tiny", [1, 2], 16, 3, 1
    have = len(os.sched_getaffinity(0))
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="threads-") as tmp:
        model, baseline = compile_bundles(args.preset, Path(tmp), args.context,
                                          args.iters * args.rounds + 8)
        for n in args.cores:
            if n > have:
                summary.append(f"{n} cores: skipped (this machine has {have})")
                continue
            run = subprocess.run([sys.executable, __file__, "--child", str(n), "--bundles",
                                  str(model), str(baseline), "--context", str(args.context),
                                  "--iters", str(args.iters), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True)
            if run.returncode:
                print(run.stderr, file=sys.stderr)
                return run.returncode
            ms = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append({"cores": n, **ms})
            st, sq, bl = (ms[k]["median_ms"] for k in ("staggered", "sequential", "baseline"))
            summary.append(f"{n} cores, {args.preset}, ctx {args.context}: staggered "
                           f"{'+'.join(map(str, ms['staggered']['threads']))} {st:.2f} ms/token, "
                           f"sequential {n}t {sq:.2f}, P=1 baseline {n}t {bl:.2f} -> stagger "
                           f"gain {sq / st:.2f}x, vs baseline {bl / st:.2f}x")
    result = {"dry_run": args.dry_run, "preset": args.preset, "context": args.context,
              "rows": rows, "summary": summary}
    for line in summary:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
