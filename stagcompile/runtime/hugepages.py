"""Back the ONNX Runtime backend's weights with huge pages (Linux transparent huge pages), so a
decode step's stream over every weight does not miss the TLB every 4 KiB.

    before = snapshot()
    ... create the sessions (ONNX Runtime prepacks the weights into memory it allocates) ...
    done = advise(before)          # an Advice: mode, ranges, bytes, collapsed

`snapshot` first sets glibc's mmap threshold to 2 MiB (`mallopt(M_MMAP_THRESHOLD)`), so what the
sessions allocate from then on gets mappings of its own instead of reusing free heap space that a
process which freed big blocks before (an export, torch) keeps; once set, glibc stops moving the
threshold. `advise` marks each anonymous read-write mapping of at least 2 MiB that appeared since
the snapshot `madvise(MADV_HUGEPAGE)` and asks the kernel to move its pages onto huge ones now
(`MADV_COLLAPSE`, Linux >= 6.1; on older kernels khugepaged collapses marked memory in the
background). Only memory that appeared in between is touched, so a peer's sessions in the same
process keep the pages they had. Both calls are advice: contents never change, and where they are
unavailable (not Linux, THP disabled, no libc) nothing happens and the Advice says why.
`backed()` is how much of the process's memory is on huge pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
M_MMAP_THRESHOLD = -3
MIN_BYTES = 2 << 20      # smaller mappings hold no whole huge page
THP = Path("/sys/kernel/mm/transparent_hugepage")


def _mode() -> str:
    """The kernel's THP mode (always | madvise | never), or why there is none."""
    if not sys.platform.startswith("linux"):
        return "unavailable (not Linux)"
    try:
        text = (THP / "enabled").read_text()
    except OSError:
        return "unavailable (no transparent huge pages in this kernel)"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def _page() -> int:
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def snapshot() -> set[tuple[int, int]]:
    """The anonymous read-write mappings of at least MIN_BYTES, as (start, end); large
    allocations after it get mappings of their own (glibc)."""
    if not sys.platform.startswith("linux"):
        return set()
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MIN_BYTES)
    out = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()       # range perms offset dev inode [path]
            anonymous = len(fields) == 5 or fields[5] == "[heap]"
            if anonymous and fields[1].startswith("rw"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start >= MIN_BYTES:
                    out.add((start, end))
    return out


def backed() -> int:
    """Bytes of this process's anonymous memory on huge pages (0 where unknown)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Advice:
    """What `advise` did: the kernel's mode (or "off", or why nothing could be done), the
    address ranges it advised and how many of their bytes the kernel collapsed right away."""
    mode: str
    ranges: list[tuple[int, int]] = field(default_factory=list)
    collapsed: int = 0

    @property
    def bytes(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)


def advise(before: set[tuple[int, int]]) -> Advice:
    """Huge pages for the mappings that appeared since `before`; returns what was done."""
    done = Advice(_mode())
    if done.mode not in ("always", "madvise"):
        return done
    libc = _libc()
    if libc is None:
        done.mode = "unavailable (libc not found)"
        return done
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = _page()
    for start, end in sorted(snapshot() - before):
        lo, hi = -(-start // page) * page, end // page * page      # whole huge pages inside
        if hi <= lo:
            continue
        libc.madvise(lo, hi - lo, MADV_HUGEPAGE)
        done.ranges.append((lo, hi))
        if libc.madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done.collapsed += hi - lo
    return done
