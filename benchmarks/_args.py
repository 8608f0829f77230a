"""The start of every bundle benchmark: its arguments, then the command it runs, echoed first."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def parse(doc: str, *options: tuple[str, int], bundles: str = "bundle") -> argparse.Namespace:
    """Arguments BUNDLE (or BUNDLE ... with bundles="bundles"), --context, --batch, --flavour
    and the script's own integer `options` [(flag, default)]; prints `$ python benchmarks/NAME
    ARGS`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if bundles == "bundles":
        ap.add_argument("bundles", type=Path, nargs="+")
    else:
        ap.add_argument("bundle", type=Path)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--flavour", choices=("ort", "portable", "plugin"), default=None,
                    help="graphs to run (default: ort when the bundle has them, else portable)")
    for flag, default in options:
        ap.add_argument(flag, type=int, default=default)
    args = ap.parse_args()
    print(f"$ python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:]), flush=True)
    return args
