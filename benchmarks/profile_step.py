"""Where a decode step's time goes: graph runs, commits, barrier, sampling and Python overhead.

    python benchmarks/profile_step.py BUNDLE [--context 128] [--steps 200] [--batch 1]

Runs the staggered schedule (one intra-op thread per stack) on an exported bundle, timing each
part of every step with perf_counter: set_step (token and position written in place), each
stack's `run_with_iobinding` and commit (on its own thread), the barrier (step wall time minus
the slowest stack's run + commit), and greedy sampling. Prints medians in microseconds and each
part's share of the step.
"""

from __future__ import annotations

import time

import numpy as np

from _args import parse
from stagcompile.runtime.bundle import Bundle
from stagcompile.runtime.generator import Generator, make_backend
from stagcompile.runtime.sampling import Sampler, Sampling


def instrument(backend, timings: dict) -> None:
    """Wrap the backend's per-stack run and commit with timers (before the scheduler takes
    `launch`; each key is appended to by one thread only)."""

    def launch(k: int, parity: int) -> None:
        t0 = time.perf_counter()
        backend.sessions[k].run_with_iobinding(backend.binding(k, parity))
        t1 = time.perf_counter()
        backend.state.commit(k, parity, backend.rows)
        t2 = time.perf_counter()
        timings[f"stack {k + 1} run"].append(t1 - t0)
        timings[f"stack {k + 1} commit"].append(t2 - t1)

    backend.launch = launch


def main() -> None:
    args = parse(__doc__, ("--steps", 200))
    bundle = Bundle.load(args.bundle, verify=False)
    p = bundle.num_stacks
    backend = make_backend(bundle, "ort", "staggered", [1] * p, False, args.flavour)
    timings: dict[str, list[float]] = {f"stack {k + 1} {part}": [] for k in range(p)
                                       for part in ("run", "commit")}
    instrument(backend, timings)
    gen = Generator(bundle, backend, "staggered")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, bundle.config["vocab_size"], (args.batch, args.context))
    sample = Sampler(Sampling())
    gen.prefill(prompt)
    sched = gen.scheduler
    for name in ("set_step", "step wall", "sampling"):
        timings[name] = []
    tok = np.zeros(args.batch, np.int64)
    for i in range(args.steps + 10):
        if i % 50 == 0:
            sched.seek(args.context)
        t0 = time.perf_counter()
        backend.set_step(tok, sched.pos)
        t1 = time.perf_counter()
        sched.pool.run(sched.pos % 2)
        sched.pos += 1
        t2 = time.perf_counter()
        tok = sample(backend.finish())
        t3 = time.perf_counter()
        timings["set_step"].append(t1 - t0)
        timings["step wall"].append(t2 - t1)
        timings["sampling"].append(t3 - t2)
    gen.close()
    us = {k: np.array(v[10:]) * 1e6 for k, v in timings.items()}   # drop warm-up steps
    slowest = np.max([us[f"stack {k + 1} run"] + us[f"stack {k + 1} commit"] for k in range(p)], 0)
    us["barrier + dispatch"] = us["step wall"] - slowest
    total = np.median(us["set_step"] + us["step wall"] + us["sampling"])
    print(f"\n{args.bundle.name} ({backend.flavour} graphs): batch {args.batch}, context "
          f"{args.context}, staggered "
          f"{'+'.join(['1'] * p)} threads, {args.steps} steps\n")
    print("| part | median us | share of step |")
    print("|---|---|---|")
    for name, v in us.items():
        print(f"| {name} | {np.median(v):.1f} | {np.median(v) / total:.1%} |")
    print(f"| whole step (set_step + step + sampling) | {total:.1f} | 100% |")


if __name__ == "__main__":
    main()
