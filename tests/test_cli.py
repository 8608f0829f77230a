"""The console script: init + inspect in a subprocess, and one-line errors with exit status 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("stagcompile", path=str(Path(sys.executable).parent))


def run(*args, check=True):
    proc = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ck"
    run("init", "--preset", "tiny", "-o", path, "--seed", "3", "--set", "num_stacks=3",
        "--set", "cross_window=4")
    return path


def test_init_then_inspect(tiny_ckpt):
    assert (tiny_ckpt / "config.json").is_file() and (tiny_ckpt / "model.safetensors").is_file()
    rep = json.loads(run("inspect", tiny_ckpt, "--json", "--context", "32").stdout)
    assert rep["config"]["num_stacks"] == 3 and rep["config"]["cross_window"] == 4
    assert [s["stack"] for s in rep["stacks"]] == [1, 2, 3]
    assert rep["stacks"][1]["cross_kv_bytes"] == 2 * 2 * 2 * 16 * 4 * 4   # L*(k,v)*Hkv*D*4B*C
    assert 1.0 < rep["ideal_staggered_speedup"] <= 3.0
    text = run("inspect", tiny_ckpt).stdout
    assert "ideal staggered speedup" in text and "KV cache" in text
    # piped output is not cut to 80 columns: every number appears whole
    assert "\u2026" not in text and "weight bytes/token" in text
    assert f"{rep['stacks'][0]['params_owned']:,}" in text


def test_errors_are_one_line(tmp_path, tiny_ckpt):
    for args, needle in [
        (("inspect", tmp_path / "missing"), "not a checkpoint directory"),
        (("init", "--preset", "huge", "-o", tmp_path / "x"), "unknown preset 'huge'"),
        (("init", "--preset", "tiny", "-o", tiny_ckpt), "already exists; pass --force"),
        (("init", "--preset", "tiny", "-o", tmp_path / "y", "--set", "n_kv_heads=3"),
         "n_kv_heads=3: must divide n_heads=4"),
    ]:
        proc = run(*args, check=False)
        assert proc.returncode == 1, args
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 3
