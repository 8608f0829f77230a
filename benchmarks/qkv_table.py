"""The first-layer Q|K|V table, measured: the same weights exported with `--qkv-table on` and
`off`, and ONNX Runtime GenAI's model of the P = 1 weights, interleaved in one process.

    python benchmarks/qkv_table.py [--preset small] [--context 128] [--iters 5] [--rounds 20]
                                   [--warmup 3] [--no-peer]

Random weights of the preset (a StagFormer and the P = 1 baseline of the same depth, as
`stagcompile bench` builds them), ort flavour, batch 1, fp32, ORT spinning off. Rows: our P = 1 at
1 and all threads with the table on and off, the StagFormer staggered at 1 thread per stack on
and off, and the peer at 1 and all threads (needs `stagcompile[peer]`). Prints median ms per token
and the ratios on/off and peer/ours; checks the table changes no greedy token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stagcompile.bench import _peer_runners, _runtime_runners, cores, measure  # noqa: E402
from stagcompile.bench import prepare_checkpoints  # noqa: E402
from stagcompile.config import load_config  # noqa: E402
from stagcompile.export import export_bundle  # noqa: E402


def greedy(bundle: Path, prompt: np.ndarray, n: int) -> list[int]:
    from stagcompile.runtime.generator import Generator

    gen = Generator.load(bundle, verify=False)
    try:
        return gen.generate(prompt, n)[0].tolist()
    finally:
        gen.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    a = ap.parse_args()
    n_cores, margin = cores(), a.warmup + a.iters + 2
    with tempfile.TemporaryDirectory(prefix="qkvtable-") as tmp:
        work = Path(tmp)
        ckpts = prepare_checkpoints(None, a.preset, work, ["unbounded"], 32)
        bundles = {}
        for variant in ("unbounded", "baseline"):
            for table in ("on", "off"):
                out = work / f"{variant}-{table}"
                export_bundle(ckpts[variant], out, "ort", "fp32", a.context + margin, 1,
                              show_progress=False, qkv_table=table)
                bundles[variant, table] = out
        vocab = load_config(ckpts["baseline"]).vocab_size
        prompt = np.random.default_rng(0).integers(0, vocab, (1, a.context))
        for variant in ("unbounded", "baseline"):
            on, off = (greedy(bundles[variant, t], prompt[:, :8], 16) for t in ("on", "off"))
            print(f"{variant}: greedy tokens {'identical' if on == off else 'DIFFER'} with and "
                  "without the table (16 steps)")
            if on != off:
                return 1
        runners = []
        for table in ("on", "off"):
            for r in (_runtime_runners(bundles["baseline", table], prompt, "baseline", "ort",
                                       n_cores, False, False, "ort")
                      + [r for r in _runtime_runners(bundles["unbounded", table], prompt,
                                                     "unbounded", "ort", n_cores, False, True,
                                                     "ort")
                         if r.label in ("staggered 1+1", "stack 1 alone", "stack 2 alone")]):
                r.label = f"{r.label}, table {table}"
                runners.append(r)
        if not a.no_peer:
            from stagcompile.peer import build_peer
            runners += _peer_runners(build_peer(ckpts["baseline"], work / "peer", "fp32"),
                                     prompt, n_cores, False, margin)
        measure(runners, a.iters, a.rounds, a.warmup)
        ms = {r.label: float(np.median(r.steps_s)) * 1e3 for r in runners}
        print(f"\n{a.preset}, context {a.context}, {n_cores} cores, {a.rounds} rounds x "
              f"{a.iters} steps; median ms per token")
        for label, v in ms.items():
            print(f"  {label:34s} {v:7.3f}")
        print("ratios (higher is better)")

        def ratio(what: str, slow: str, fast: str) -> None:
            print(f"  {what:40s} {ms[slow] / ms[fast]:.3f}")

        for t in sorted({1, n_cores}):
            base = f"baseline {t}t"
            ratio(f"P = 1 {t}t, table off / on", f"{base}, table off", f"{base}, table on")
            for table in ("on", "off") if f"ortgenai {t}t" in ms else ():
                ratio(f"ORT GenAI {t}t / our P = 1 (table {table})", f"ortgenai {t}t",
                      f"{base}, table {table}")
        for table in ("on", "off"):
            ratio(f"P = 1 1t / staggered 1+1 (table {table})", f"baseline 1t, table {table}",
                  f"staggered 1+1, table {table}")
        ratio("staggered 1+1, table off / on", "staggered 1+1, table off",
              "staggered 1+1, table on")
        for r in runners:
            gen = getattr(r, "generator", None)
            if gen is not None:
                gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
