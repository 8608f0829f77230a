"""The device ring-commit kernel (plugins.ring_commit): under the Triton interpreter against the
numpy commit of the runtime, and as PTX (compiled on CPU, assembled by ptxas when available)."""

import os
import re
import subprocess

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")      # read by triton when it is imported

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the kernel cannot be tested")

from plugins import ring_commit, triton_kernel  # noqa: E402
from stagcompile.runtime.device import commit_table  # noqa: E402
from stagcompile.runtime.rings import commit  # noqa: E402
from test_aot import _ptxas, entry_params  # noqa: E402


@pytest.mark.parametrize("pos", [0, 3, 5, 17, 1000])
def test_one_launch_commits_every_ring_at_pos_mod_capacity(pos):
    if not triton_kernel.interpreter_mode():
        pytest.skip("needs triton imported with TRITON_INTERPRET=1")
    rng = np.random.default_rng(pos)
    # [B, H, C, D] rings of several capacities, dtypes and head sizes (byte rows of 8 .. 1032)
    shapes = [((2, 2, 4, 8), np.float32), ((2, 2, 7, 8), np.float16), ((1, 3, 1, 4), np.float32),
              ((2, 1, 5, 258), np.float32)]
    rings = [rng.standard_normal(s).astype(t) for s, t in shapes]
    news = [rng.standard_normal(s[:2] + (1,) + s[3:]).astype(t) for s, t in shapes]
    want = [r.copy() for r in rings]
    for r, n in zip(want, news):
        commit(r, n, pos)
    table = commit_table([(r.ctypes.data, n.ctypes.data, r.shape[0] * r.shape[1], r.shape[2],
                           r.shape[3] * r.itemsize) for r, n in zip(rings, news)])
    pos_arr = np.full(2, pos, np.int64)
    grid = (len(table), int(table[:, 2].max()))
    ring_commit.interpreted_kernel()[grid](torch.from_numpy(table), torch.from_numpy(pos_arr),
                                           BLOCK=ring_commit.BLOCK)
    for got, w in zip(rings, want):
        np.testing.assert_array_equal(got, w)


def test_ptx_declares_table_and_pos_only():
    k = ring_commit.compile_ptx()
    assert k.name == "ring_commit_kernel" and k.num_warps == ring_commit.NUM_WARPS
    assert re.search(r"^\.target sm_80$", k.ptx, flags=re.M)
    assert re.search(r"^\.version 7\.0$", k.ptx, flags=re.M)       # CUDA 11.0: any driver
    assert entry_params(k.ptx, k.name) == [".u64", ".u64"]


def test_ptx_assembles(tmp_path):
    ptxas = _ptxas(80)
    if ptxas is None:
        pytest.skip("no ptxas (neither bundled with triton nor on PATH)")
    (tmp_path / "k.ptx").write_text(ring_commit.compile_ptx().ptx)
    run = subprocess.run([str(ptxas), "--gpu-name", "sm_80", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
