"""StagFormer versus baselines at small scale: validation bits per byte under one token budget.

    python benchmarks/quality.py --train TRAIN.txt.xz --val VAL.txt.xz --tokenizer tokenizer.json \
        [--suite paper|screen|recipe] [--steps N] [--seeds 0 1 2] [--threads 1] [--out runs/quality]

Every row has the same data, tokenizer, steps x batch x sequence length and width; rows differ in
the model config and the trainer's stack-1 options (stagcompile/train.py). Suites:

    paper   (1500 steps, seed 0) the paper-faithful variants: P=1 with 2L and L layers, P=2
            separate, shared, shared decoded recurrently (prefill the first half of each window,
            then one pass per token; compared with its own standard decoding on the same
            positions), cross_window 1 and 16
    screen  (400 steps, seed 0) the baselines and P=2 separate with each candidate recipe alone
            and the combinations tried
    recipe  (1500 steps, seeds 0 1 2) the P = 1 baselines and P=2 (separate weights) with the
            adopted recipe

Prints a markdown table (per row: mean and spread over seeds, each seed's value, wall time) and
writes OUT/SUITE/quality.json (every run and the summary). Runs already in OUT are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stagcompile import checkpoint
from stagcompile.generate import CachedDecoder
from stagcompile.tokenizer import encode, load_tokenizer, read_text
from stagcompile.train import TrainOptions, train

WIDTH = ["d_model=128", "n_heads=4", "n_kv_heads=4", "d_ff=384", "max_seq_len=128"]
P1_2L, P1_L = ["num_stacks=1", "layers_per_stack=4"], ["num_stacks=1", "layers_per_stack=2"]
P2 = ["num_stacks=2", "layers_per_stack=2"]
SHARED = P2 + ["shared_weights=true"]
GATE = ["cross_gate=true"]
RECIPE = {"aux_loss": 1.0, "stack1_lr_mult": 0.1}      # with GATE: the adopted stack-1 recipe


@dataclass(frozen=True)
class Row:
    name: str
    config: list[str]
    options: dict = field(default_factory=dict)
    recurrent: bool = False         # also measure recurrent decoding (shared, P = 2)


BASELINES = [Row("P=1, 2L=4 layers", P1_2L), Row("P=1, L=2 layers", P1_L),
             Row("P=2 separate", P2)]
SUITES = {
    "paper": BASELINES + [
        Row("P=2 shared", SHARED, recurrent=True),
        Row("P=2 cross_window 1", P2 + ["cross_window=1"]),
        Row("P=2 cross_window 16", P2 + ["cross_window=16"]),
    ],
    "screen": BASELINES + [
        Row("P=2 stack1 lr x0.3", P2, {"stack1_lr_mult": 0.3}),
        Row("P=2 stack1 lr x0.1", P2, {"stack1_lr_mult": 0.1}),
        Row("P=2 aux loss 0.25", P2, {"aux_loss": 0.25}),
        Row("P=2 aux loss 1", P2, {"aux_loss": 1.0}),
        Row("P=2 cross gate", P2 + GATE),
        Row("P=2 init per-stack depth", P2, {"init_depth": "stack"}),
        Row("P=2 detach keys", P2, {"detach_memory": "keys"}),
        Row("P=2 detach values", P2, {"detach_memory": "values"}),
        Row("P=2 cross gate + aux loss 1", P2 + GATE, {"aux_loss": 1.0}),
        Row("P=2 aux loss 1 + memory detached", P2, {"aux_loss": 1.0, "detach_memory": "both"}),
        Row("P=2 cross gate + aux loss 1 + detach values", P2 + GATE,
            {"aux_loss": 1.0, "detach_memory": "values"}),
        Row("P=2 cross gate + aux loss 1 + stack1 lr x0.1", P2 + GATE, RECIPE),
    ],
    "recipe": BASELINES[:2] + [Row("P=2 separate, recipe", P2 + GATE, RECIPE)],
}
DEFAULTS = {"paper": (1500, [0]), "screen": (400, [0]), "recipe": (1500, [0, 1, 2])}


@torch.no_grad()
def second_half_bpb(model, val: np.ndarray, bytes_per_token: float, seq_len: int,
                    windows: int, recurrent: bool, seed: int = 7) -> float:
    """Bits per byte over positions seq_len/2 .. seq_len-1 of fixed validation windows, with the
    first half prefilled; decoding recurrent (one pass 2 per token) or standard cached."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - seq_len - 1, windows)
    half = seq_len // 2
    nats, count = 0.0, 0
    for s in starts:
        ids = torch.from_numpy(val[s: s + seq_len + 1].astype(np.int64))[None]
        dec = CachedDecoder(model, 1, recurrent=recurrent)
        logits = [dec.prefill(ids[:, :half])[:, -1]]
        for i in range(half, seq_len - 1):
            logits.append(dec.step(ids[:, i]))
        lg = torch.stack(logits, 1)[0]
        nats += float(torch.nn.functional.cross_entropy(lg, ids[0, half: seq_len], reduction="sum"))
        count += lg.shape[0]
    return nats / count / math.log(2) / bytes_per_token


def recurrent_result(out: Path, args, result: dict) -> dict:
    """The recurrent-decoding row of the shared model trained in `out`."""
    model = checkpoint.load(out)
    val_text = read_text(args.val)
    val = encode(load_tokenizer(args.tokenizer), val_text)
    bpt = len(val_text.encode("utf-8")) / len(val)
    rec = second_half_bpb(model, val, bpt, args.seq_len, args.recurrent_windows, True)
    std = second_half_bpb(model, val, bpt, args.seq_len, args.recurrent_windows, False)
    print(f"{result['row']} recurrent: {rec:.4f} (standard {std:.4f} on the same positions)",
          flush=True)
    return result | {"row": f"{result['row']} recurrent", "val_bpb": rec,
                     "note": f"second-half positions; same model decoded normally: {std:.4f}"}


def run_row(row: Row, seed: int, args) -> list[dict]:
    out = args.out / f"{row.name.replace(' ', '_').replace(',', '').replace('=', '')}-s{seed}"
    log_file = out / "train_log.json"
    if log_file.exists():
        log = json.loads(log_file.read_text())
    else:
        opts = TrainOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr=3e-3, warmup=100, eval_every=max(1, args.steps // 5),
                            eval_batches=32, save_every=args.steps, seed=seed, **row.options)
        log = train([args.train], out, "demo", WIDTH + row.config, opts, val_file=args.val,
                    tokenizer_file=args.tokenizer, show_progress=False)
    last = log[-1]
    params = sum(p.numel() for p in checkpoint.load(out).parameters())
    result = {"row": row.name, "seed": seed, "config": row.config, "options": row.options,
              "params": params, "tokens": last["tokens"], "steps": last["step"],
              "wall_s": last["wall_s"], "val_bpb": last["val_bpb"],
              "history": [(e["step"], e["val_bpb"]) for e in log]}
    print(f"{row.name}: seed {seed}, val bpb {last['val_bpb']:.4f}, {last['wall_s']:.0f} s",
          flush=True)
    return [result] + ([recurrent_result(out, args, result)] if row.recurrent else [])


def summarise(results: list[dict]) -> list[dict]:
    """Per row (in order of first appearance): mean, sample standard deviation and range of the
    final validation bits per byte over seeds."""
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    out = []
    for name, rs in rows.items():
        bpb = [r["val_bpb"] for r in rs]
        out.append({"row": name, "seeds": [r["seed"] for r in rs], "val_bpb": bpb,
                    "mean": statistics.fmean(bpb),
                    "sd": statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
                    "min": min(bpb), "max": max(bpb), "params": rs[0]["params"],
                    "tokens": rs[0]["tokens"], "steps": rs[0]["steps"],
                    "wall_s": statistics.fmean(r["wall_s"] for r in rs),
                    "notes": [r["note"] for r in rs if "note" in r]})
    return out


def print_table(summary: list[dict]) -> None:
    print("\n| row | seeds | parameters | tokens | steps | wall (s) | val bits/byte: mean "
          "| sd | min - max | per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        seeds = " ".join(map(str, s["seeds"]))
        per_seed = ", ".join(f"{v:.4f}" for v in s["val_bpb"])
        notes = "".join(f" ({n})" for n in s["notes"])
        print(f"| {s['row']} | {seeds} | {s['params']:,} | {s['tokens']:,} | {s['steps']} | "
              f"{s['wall_s']:.0f} | {s['mean']:.4f} | {s['sd']:.4f} | {s['min']:.4f} - "
              f"{s['max']:.4f} | {per_seed}{notes} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--suite", choices=list(SUITES), default="paper")
    ap.add_argument("--steps", type=int, help="default: 400 for screen, else 1500")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 for recipe, else 0")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--recurrent-windows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = ap.parse_args()
    steps, seeds = DEFAULTS[args.suite]
    args.steps, args.seeds = args.steps or steps, args.seeds or seeds
    args.out = args.out / args.suite
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    print("$ " + command, flush=True)
    results = [r for seed in args.seeds for row in SUITES[args.suite]
               for r in run_row(row, seed, args)]
    summary = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(
        {"command": command, "suite": args.suite, "runs": results, "summary": summary}, indent=1))
    print_table(summary)


if __name__ == "__main__":
    main()
