"""The shipped demo checkpoint: it loads, matches its config and model card, and compiles into a
bundle that validates against the reference and generates text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from stagcompile import checkpoint
from stagcompile.config import preset
from stagcompile.demo import DEMO_DIR

pytestmark = pytest.mark.xdist_group("demo")


def test_demo_checkpoint_loads_and_matches_its_config():
    model = checkpoint.load(DEMO_DIR, dtype=None)
    cfg = model.cfg
    # trained with the stack-1 recipe (scripts/train_demo.sh: --set cross_gate=true)
    assert cfg == preset("demo").replace(vocab_size=cfg.vocab_size, cross_gate=True)
    assert (cfg.num_stacks, cfg.shared_weights) == (2, False)
    assert str(next(model.parameters()).dtype) == "torch.float16"
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    assert (DEMO_DIR / "tokenizer.json").is_file()
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert "bits per byte" in card and "scripts/train_demo.sh" in card
    assert "--set cross_gate=true --stack1-lr-mult 0.1 --aux-loss 1.0" in card


def test_demo_compiles_validates_and_generates(tmp_path):
    exe = shutil.which("stagcompile", path=os.path.dirname(sys.executable))
    out = tmp_path / "demo"
    proc = subprocess.run([exe, "compile", str(DEMO_DIR), "-o", str(out)], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "validation" / "report.json").read_text())["passed"]
    run = subprocess.run([sys.executable, str(out / "runtime" / "run.py"), "--prompt",
                          "To be, or not to be", "-n", "24"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    text = run.stdout.strip()
    assert len(text) > 20 and sum(c.isalpha() for c in text) > 10
    assert "ms/token median" in run.stderr
