"""The peer a CPU user would pick: ONNX Runtime GenAI, on the same weights, for `stagcompile bench`.

`build_peer(checkpoint, work)` writes the P = 1 checkpoint as a Hugging Face Llama folder
(`stagcompile.hf.export_hf`) and runs ONNX Runtime GenAI's own model builder on it
(`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`, or `-p int4` for its int4 model):
the graph a user of that project gets. `peer_runners` time its decode steps with its Python API
(`Generator.generate_next_token`: the model step plus its greedy search), at the same thread
counts and spinning setting as ours. Optional: needs `pip install stagcompile[peer]`
(onnxruntime-genai and transformers, which its builder imports).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from stagcompile.errors import StagError

INSTALL = "pip install onnxruntime-genai transformers (or stagcompile[peer])"


def check_available() -> None:
    try:
        import onnxruntime_genai  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise StagError(f"--peer ortgenai needs ONNX Runtime GenAI and transformers ({exc.name} "
                        f"is missing): {INSTALL}") from None


def build_peer(checkpoint_dir: Path, work: Path, precision: str = "fp32") -> Path:
    """ONNX Runtime GenAI's model of a P = 1 checkpoint; returns its folder."""
    from stagcompile import checkpoint
    from stagcompile.hf import copy_tokenizer, export_hf

    model = checkpoint.load(checkpoint_dir)
    hf = export_hf(model, Path(work) / "hf")
    tok = checkpoint.tokenizer_path(checkpoint_dir)
    if tok is None:
        from stagcompile.demo import DEMO_DIR
        tok = DEMO_DIR / "tokenizer.json"     # the builder wants one; ids are all we feed
    copy_tokenizer(tok, hf)
    out = Path(work) / f"ortgenai-{precision}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(Path(work) / "hf-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise StagError(f"ONNX Runtime GenAI's builder failed on {hf}: {' | '.join(tail)}")
    return out


def open_model(folder: Path, threads: int, spinning: bool):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    spin = "1" if spinning else "0"
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": spin, "session.inter_op.allow_spinning": spin}}}}))
    return og.Model(config)


class PeerSession:
    """One ORT GenAI generator over a prompt: prefill, decode steps, restart at the context."""

    def __init__(self, folder: Path, prompt: np.ndarray, threads: int, spinning: bool,
                 max_new: int):
        if prompt.shape[0] != 1:
            raise StagError("the ortgenai peer is measured at batch 1")
        self.model = open_model(folder, threads, spinning)
        self.prompt = prompt[0].astype(np.int32)
        self.max_length = len(self.prompt) + max_new + 2
        self.gen = None

    def prefill(self) -> None:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.gen = og.Generator(self.model, params)
        self.gen.append_tokens(self.prompt)

    def step(self) -> None:
        self.gen.generate_next_token()

    def restart(self) -> None:
        """Prefill again, then take the first token, which only samples the prefill's logits:
        every later `step` runs one decode step of the model, like ours."""
        self.prefill()
        self.step()

    def tokens(self, n: int) -> list[int]:
        """Greedy tokens after the prompt (for the same-weights check)."""
        self.prefill()
        out = []
        for _ in range(n):
            self.step()
            out.append(int(self.gen.get_next_tokens()[0]))
        return out


def same_greedy_tokens(folder: Path, bundle_dir: Path, vocab: int, n: int = 16) -> dict:
    """Greedy tokens of the peer and of our P = 1 bundle from one random prompt: the check that
    both run the same weights (identical on an fp32 model)."""
    from stagcompile.runtime.generator import Generator

    prompt = np.random.default_rng(1).integers(0, vocab, (1, 8)).astype(np.int64)
    gen = Generator.load(bundle_dir, verify=False)
    n = min(n, gen.bundle.config["max_seq_len"] - prompt.shape[1])     # both stop at capacity
    try:
        ours = [int(t) for t in gen.generate(prompt, n)[0]]
    finally:
        gen.close()
    theirs = PeerSession(folder, prompt, 1, False, n).tokens(n)
    return {"ours": ours, "peer": theirs, "match": ours == theirs}
