"""Huge pages for the ort backend's weights: only memory that appeared after the snapshot is
advised, contents never change, generation is identical with and without, and the switch reaches
the runtime's command line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_model
from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.export import export_bundle
from stagcompile.runtime import Generator
from stagcompile.runtime import hugepages

THP = hugepages._mode() in ("always", "madvise")
needs_thp = pytest.mark.skipif(not THP, reason="no transparent huge pages here "
                               f"({hugepages._mode()})")


@needs_thp
def test_only_new_mappings_are_advised_and_contents_stay():
    old = np.random.default_rng(0).random(4 << 20)                # 32 MiB, before the snapshot
    before = hugepages.snapshot()
    new = np.random.default_rng(1).random(3 << 20)                # 24 MiB, after it
    want = hashlib.sha256(new.data).hexdigest()
    rep = hugepages.advise(before)
    assert rep.mode in ("always", "madvise") and len(rep.ranges) >= 1
    assert 16 << 20 <= rep.bytes <= 28 << 20, rep                  # the new array, not the old

    def advised(arr) -> bool:
        start = arr.ctypes.data
        return any(lo < start + arr.nbytes and start < hi for lo, hi in rep.ranges)

    assert hashlib.sha256(new.data).hexdigest() == want
    assert advised(new) and not advised(old)
    if rep.collapsed:                                              # Linux >= 6.1
        assert hugepages.backed() >= rep.collapsed // 2


def test_nothing_new_nothing_done():
    rep = hugepages.advise(hugepages.snapshot())
    assert rep.ranges == [] and rep.bytes == 0


@pytest.fixture(scope="module")
def mid_bundle(tmp_path_factory):
    """A P = 1 model with weights of 4 to 8 MiB each (ONNX Runtime prepacks them into
    mappings that hold whole huge pages)."""
    root = tmp_path_factory.mktemp("hugepages")
    cfg = preset("tiny").replace(vocab_size=2048, d_model=512, n_heads=8, n_kv_heads=8,
                                 d_ff=2048, num_stacks=1, layers_per_stack=1)
    checkpoint.save(make_model(cfg), root / "ck")
    return export_bundle(root / "ck", root / "b", "ort", show_progress=False)


def test_generation_identical_with_and_without_huge_pages(mid_bundle):
    prompt = np.random.default_rng(2).integers(0, 2048, (1, 6))
    out = {}
    for on in (True, False):
        gen = Generator.load(mid_bundle, huge_pages=on)
        try:
            out[on] = gen.generate(prompt, 10)
            rep = gen.scheduler.backend.huge_pages
        finally:
            gen.close()
        if not on:
            assert rep.mode == "off" and rep.bytes == 0
        elif THP:
            assert rep.bytes > 0, rep
    np.testing.assert_array_equal(out[True], out[False])


def test_run_command_takes_no_huge_pages(mid_bundle):
    exe = shutil.which("stagcompile", path=os.path.dirname(sys.executable))
    runs = [subprocess.run([exe, "run", str(mid_bundle), "--ids", "1,2,3", "-n", "4", *flag],
                           capture_output=True, text=True, timeout=300)
            for flag in ([], ["--no-huge-pages"])]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    assert runs[0].stdout == runs[1].stdout
    assert "on huge pages" not in runs[1].stderr
    if THP:
        assert "MiB on huge pages" in runs[0].stderr
