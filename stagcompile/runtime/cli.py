"""Command line of the generated runtime:

    python BUNDLE/runtime/run.py --prompt "Once upon a time" --max-new-tokens 64
    python -m runtime --ids 1,2,3 --schedule sequential          (from inside BUNDLE)

Streams the text to stdout as it is produced, then prints the prefill time, the per-token decode
latency (median, p90), tokens per second, backend and schedule to stderr. Ctrl-C stops the
generation and still prints the summary ("stopped: interrupted"; exit status 130). Memory does not
grow with the number of tokens when streaming one row (see stats.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .bundle import BundleError
from .generator import BACKENDS, Generator
from .sampling import Sampling
from .scheduler import SCHEDULES, CapacityError


def parser(default_bundle: Path | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="Generate text with a stagcompile "
                                "bundle (staggered StagFormer runtime).")
    p.add_argument("--bundle", type=Path, default=default_bundle,
                   help="bundle folder (default: the one this runtime lives in)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch "
                     "(prompts must tokenize to the same length)")
    src.add_argument("--ids", action="append", help="comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", "-n", type=int, default=32)
    p.add_argument("--backend", choices=BACKENDS, default="ort")
    p.add_argument("--schedule", choices=SCHEDULES, default="staggered")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads per stack (default: 1 staggered, all "
                        "cores sequential)")
    p.add_argument("--spinning", action="store_true", help="let idle ONNX Runtime threads spin")
    p.add_argument("--no-huge-pages", action="store_true", help="leave the ort backend's "
                   "weights on the kernel's default pages (default: transparent huge pages, "
                   "Linux)")
    p.add_argument("--flavour", choices=("ort", "portable", "plugin"), default=None,
                   help="graphs the ort backend runs (default: ort when the bundle has them, "
                        "else portable)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos-id", type=int, default=None, help="stop token (default: the "
                   "tokenizer's <|endoftext|> when present)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end only")
    return p


def _ids(args) -> np.ndarray:
    try:
        rows = [[int(x) for x in row.split(",") if x.strip()] for row in args.ids]
    except ValueError:
        raise ValueError(f"--ids {args.ids}: expected comma-separated integers") from None
    if not all(rows):
        raise ValueError(f"--ids {args.ids}: give at least one token id per row")
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every --ids row must have the same length")
    huge = [x for r in rows for x in r if not -2**63 <= x < 2**63]
    if huge:
        raise ValueError(f"--ids: token id {huge[0]} is out of range (ids are 0 .. vocab_size - 1)")
    return np.array(rows, dtype=np.int64)


def main(argv=None, default_bundle: Path | None = None) -> int:
    args = parser(default_bundle).parse_args(argv)
    if args.bundle is None:
        print("error: --bundle is required", file=sys.stderr)
        return 2
    gen = None
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        gen = Generator.load(args.bundle, args.backend, args.schedule, args.threads, args.spinning,
                             flavour=args.flavour, huge_pages=not args.no_huge_pages)
        ids = gen.encode(args.prompt) if args.prompt else _ids(args)
        vocab = gen.bundle.config["vocab_size"]
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got {ids.min()}..{ids.max()}")
        eos = args.eos_id if args.eos_id is not None else gen.eos_id
        generate(gen, ids, args, sampling, eos)
        report(gen)
    except (BundleError, CapacityError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if gen is None:
            print("interrupted", file=sys.stderr)
        else:
            gen.stats.stopped = "interrupted"
            print()
            report(gen)
        return 130
    finally:
        if gen is not None:
            gen.close()
    return 0


def generate(gen: Generator, ids: np.ndarray, args, sampling: Sampling, eos) -> None:
    """Stream one row's text as it comes; print a batch (or --no-stream) at the end."""
    stream = not args.no_stream and ids.shape[0] == 1
    out = []
    for tokens in gen.stream(ids, args.max_new_tokens, sampling, eos):
        if stream:
            piece = gen.decode([tokens[0]])
            sys.stdout.write(piece if gen.tokenizer else piece + " ")
            sys.stdout.flush()
        else:
            out.append(tokens)
    if stream:
        print()
    else:
        for row in np.stack(out, 1):
            print(gen.decode(row))


def report(gen: Generator) -> None:
    s = gen.stats.summary()
    print(f"[{gen.backend_name}, {gen.schedule}] batch {s['batch']}, prompt {s['prompt_tokens']} "
          f"tokens: prefill {s['prefill_ms']:.1f} ms; decode {s['decode_ms_median']:.2f} ms/token "
          f"median, {s['decode_ms_p90']:.2f} ms p90; {s['decode_tokens_per_s']:.1f} tokens/s"
          + huge_pages(gen) + (f"; stopped: {s['stopped']}" if s["stopped"] else ""),
          file=sys.stderr)


def huge_pages(gen: Generator) -> str:
    """"; N MiB on huge pages" when the backend advised its memory onto them."""
    from .hugepages import backed

    done = getattr(gen.scheduler.backend, "huge_pages", None)
    if done is None or not done.bytes:
        return ""
    return f"; {backed() / 2 ** 20:.0f} MiB on huge pages"
