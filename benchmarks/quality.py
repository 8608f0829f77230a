"""StagFormer versus baselines at small scale: validation bits per byte under one token budget.

    python benchmarks/quality.py --train TRAIN.txt.xz --val VAL.txt.xz --tokenizer tokenizer.json \
        [--steps 1500] [--seeds 0] [--out runs/quality]

Rows (same data, same tokenizer, same steps x batch x sequence length, same width):
    P=1, 2L layers        the plain transformer of the same total depth
    P=1, L layers         the plain transformer of one stack's depth
    P=2 separate          StagFormer, separate weights
    P=2 shared            StagFormer, shared weights
    P=2 shared recurrent  the shared model decoded recurrently (prefill the first half of each
                          window, then one pass per token); compared with its own teacher-forced
                          loss on the same second-half positions
    P=2 cross_window 1    StagFormer, cross-attention to the previous position only
    P=2 cross_window 16   StagFormer, bounded cross-attention
Prints a markdown table (seed, tokens, steps, wall time per row) and writes quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from stagcompile import checkpoint
from stagcompile.generate import CachedDecoder
from stagcompile.tokenizer import encode, load_tokenizer, read_text
from stagcompile.train import TrainOptions, train

WIDTH = ["d_model=128", "n_heads=4", "n_kv_heads=4", "d_ff=384", "max_seq_len=128"]
ROWS = [
    ("P=1, 2L=4 layers", ["num_stacks=1", "layers_per_stack=4"]),
    ("P=1, L=2 layers", ["num_stacks=1", "layers_per_stack=2"]),
    ("P=2 separate", ["num_stacks=2", "layers_per_stack=2"]),
    ("P=2 shared", ["num_stacks=2", "layers_per_stack=2", "shared_weights=true"]),
    ("P=2 cross_window 1", ["num_stacks=2", "layers_per_stack=2", "cross_window=1"]),
    ("P=2 cross_window 16", ["num_stacks=2", "layers_per_stack=2", "cross_window=16"]),
]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recurrent-windows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = ap.parse_args()
    print("$ python benchmarks/quality.py " + shlex.join(sys.argv[1:]), flush=True)
    results = []
    for seed in args.seeds:
        for name, over in ROWS:
            out = args.out / f"{name.replace(' ', '_').replace(',', '').replace('=', '')}-s{seed}"
            opts = TrainOptions(steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, lr=3e-3, warmup=100,
                                eval_every=max(1, args.steps // 5), eval_batches=32,
                                save_every=args.steps, seed=seed)
            log = (json.loads((out / "train_log.json").read_text()) if (out / "train_log.json").exists()
                   else train([args.train], out, "demo", WIDTH + over, opts, val_file=args.val,
                              tokenizer_file=args.tokenizer, show_progress=False))
            last = log[-1]
            params = sum(p.numel() for p in checkpoint.load(out).parameters())
            results.append({"row": name, "seed": seed, "params": params, "tokens": last["tokens"],
                            "steps": last["step"], "wall_s": last["wall_s"],
                            "val_bpb": last["val_bpb"]})
            print(f"{name}: seed {seed}, val bpb {last['val_bpb']:.4f}", flush=True)
            if name == "P=2 shared":
                model = checkpoint.load(out)
                tok = load_tokenizer(args.tokenizer)
                val_text = read_text(args.val)
                val = encode(tok, val_text)
                bpt = len(val_text.encode("utf-8")) / len(val)
                rec = second_half_bpb(model, val, bpt, args.seq_len, args.recurrent_windows, True)
                std = second_half_bpb(model, val, bpt, args.seq_len, args.recurrent_windows, False)
                results.append({"row": "P=2 shared recurrent", "seed": seed, "params": params,
                                "tokens": last["tokens"], "steps": last["step"],
                                "wall_s": last["wall_s"], "val_bpb": rec,
                                "note": f"second-half positions; same model decoded normally: "
                                        f"{std:.4f}"})
                print(f"P=2 shared recurrent: {rec:.4f} (standard {std:.4f} on the same "
                      "positions)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    print("\n| row | seed | params | tokens | steps | wall (s) | val bits/byte |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        note = f" ({r['note']})" if "note" in r else ""
        print(f"| {r['row']} | {r['seed']} | {r['params']:,} | {r['tokens']:,} | {r['steps']} | "
              f"{r['wall_s']:.0f} | {r['val_bpb']:.4f}{note} |")


if __name__ == "__main__":
    main()
