"""Runtime generation: copy the runtime core (`stagcompile/runtime/`) into `BUNDLE/runtime/`.

The runtime is a small, readable package rather than generated string soup: every constant
(names, shapes, capacities, dtypes, files) comes from the bundle's manifest.json at load time, so
the copied core is the same for every bundle and is tested as part of stagcompile.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CORE = Path(__file__).resolve().parent / "runtime"


def runtime_files() -> list[Path]:
    return sorted(p for p in CORE.glob("*.py"))


def write_runtime(bundle_dir: Path) -> list[Path]:
    """Copy the runtime into bundle_dir/runtime; returns the written files."""
    dest = Path(bundle_dir) / "runtime"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in runtime_files():
        shutil.copyfile(src, dest / src.name)
        out.append(dest / src.name)
    return out
