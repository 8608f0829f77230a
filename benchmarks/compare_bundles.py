"""Bundles of one model side by side: each stack alone and every schedule, interleaved.

    python benchmarks/compare_bundles.py BUNDLE [BUNDLE ...] [--context 128] [--batch 1]
        [--iters 5] [--rounds 20] [--warmup 3]

For A/B-testing a change to the exported graphs: export the same checkpoint before and after it
(e.g. from a `git worktree` of the older commit) and pass both bundles. Every runner of
`stagcompile bench` (sequential 1 and all threads, every staggered thread split, each stack alone)
is built for every bundle and measured in the same interleaved rounds, so drift on a shared
machine hits all bundles alike. Prints median ms per decode step and each bundle's ratio to the
first.
"""

from __future__ import annotations

import sys

import numpy as np

from _args import parse
from stagcompile.bench import _runtime_runners, cores, measure
from stagcompile.runtime.bundle import Bundle


def main() -> None:
    args = parse(__doc__, ("--iters", 5), ("--rounds", 20), ("--warmup", 3), bundles="bundles")
    vocab = {Bundle.load(b, verify=False).config["vocab_size"] for b in args.bundles}
    if len(vocab) != 1:
        sys.exit(f"the bundles have different vocabularies {sorted(vocab)}: give bundles of "
                 "one model")
    prompt = np.random.default_rng(0).integers(0, vocab.pop(), (args.batch, args.context))
    per_bundle = [_runtime_runners(b, prompt, "model", "ort", cores(), False, True, args.flavour)
                  for b in args.bundles]
    measure([r for runners in per_bundle for r in runners], args.iters, args.rounds, args.warmup)
    medians = [{r.label: float(np.median(r.steps_s)) * 1e3 for r in runners}
               for runners in per_bundle]
    for runners in per_bundle:
        for r in runners:
            if getattr(r, "generator", None) is not None:
                r.generator.close()
    names = [b.name for b in args.bundles]
    print(f"\nbatch {args.batch}, context {args.context}, {args.rounds} rounds x {args.iters} "
          f"steps, median ms per step (ratio to {names[0]})\n")
    print("| configuration | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, first in medians[0].items():
        cells = [f"{first:.2f}"] + [f"{m[label]:.2f} ({m[label] / first:.2f}x)"
                                    for m in medians[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
