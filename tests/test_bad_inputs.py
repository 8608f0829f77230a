"""Issue 18's list, tried the way a user would: every bad input through the command line is one
`error: ...` line naming the file, field or flag, a non-zero exit and no traceback; nothing is
unpickled, nothing of the user's is deleted, signals stop cleanly, long runs stay in bounded
memory. (The items' unit tests live beside their code's tests: test_atomic, test_train,
test_config, test_checkpoint, test_runtime.)"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from conftest import VARIANTS, bundle_for, make_model, variant_id
from stagcompile import __version__, checkpoint
from stagcompile.runtime.bundle import Bundle

CFG = VARIANTS[7]           # tiny, P = 2, bounded windows: generation may run as long as we like
pytestmark = pytest.mark.xdist_group(variant_id(CFG))      # shares the exported bundle
EXE = shutil.which("stagcompile", path=str(Path(sys.executable).parent))
REPO = Path(__file__).resolve().parent.parent


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(needle: str, *args, code: int = 1):
    """`stagcompile ARGS` fails with one line `error: ...` containing `needle`."""
    res = cli(*args)
    assert res.exit_code == code, (args, res.stdout, res.stderr, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.stderr)
    assert needle in lines[0], (needle, lines[0])
    return res


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "ck"
    checkpoint.save(make_model(CFG), path)
    return path


@pytest.fixture(scope="module")
def exported(bundle_root):
    return bundle_for(bundle_root, CFG)[0]


@pytest.fixture
def bundle(exported, tmp_path):
    """A private copy of the exported bundle, to break."""
    return Path(shutil.copytree(exported, tmp_path / "b"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from pydoc_data.topics import topics
    path = tmp_path_factory.mktemp("text") / "topics.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:60000])
    return path


def rewrite(root: Path, edit) -> None:
    """Edit manifest.json and store it with a valid checksum (as a careful forger would)."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    Bundle(root, manifest).write_manifest()


def copy_checkpoint(ck: Path, dest: Path) -> Path:
    return Path(shutil.copytree(ck, dest))


# ---- 1. no pickle --------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):            # unpickling creates the marker file
        return (open, (self.marker, "w"))


def test_1_resume_never_unpickles(tmp_path, text):
    from stagcompile.tokenizer import train_tokenizer
    cfg = CFG.replace(vocab_size=300)
    out = tmp_path / "run"
    checkpoint.save(make_model(cfg), out)
    (out / "tokenizer.json").write_text(train_tokenizer(text.read_text(), 300).to_str())
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "optimizer": Payload(marker)}, out / "train_state.pt")   # a crafted one
    refused("train_state.pt: a pickled trainer state", "train", text, "-o", out, "--resume",
            "--preset", "tiny", "--set", "cross_window=4", "--set", "self_window=8",
            "--seq-len", "16", "--steps", "2")
    assert not marker.exists()


def test_1_no_pickle_in_the_sources():
    pattern = re.compile(r"torch\.load\(|import pickle|allow_pickle\s*=\s*True|weights_only\s*="
                         r"\s*False|np\.load\((?![^)]*allow_pickle=False)")
    hits = [f"{p.relative_to(REPO)}:{i + 1}" for folder in ("stagcompile", "graphs", "plugins",
                                                            "benchmarks", "scripts")
            for p in (REPO / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert hits == []


# ---- 2. no data loss -----------------------------------------------------------------------------
def test_2_force_never_deletes_the_checkpoint_or_other_folders(ck, tmp_path, monkeypatch):
    mine = copy_checkpoint(ck, tmp_path / "work" / "ck")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    before = tree(tmp_path)
    refused("ck: is the input", "export", mine, "-o", mine, "--force")
    refused("contains the input", "export", mine, "-o", mine.parent, "--force")
    refused("contains the input", "export", mine, "-o", mine / "..", "--force")
    refused("other: not a stagcompile bundle", "export", mine, "-o", other, "--force")
    refused("other: not a checkpoint", "init", "--preset", "tiny", "-o", other, "--force")
    refused("already exists; pass --force", "export", mine, "-o", other)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    refused(".: is the current folder", "export", mine, "-o", ".", "--force")
    assert list(empty.iterdir()) == []                    # no ..old.* or .tmp.* folder
    assert tree(tmp_path) == before


# ---- 3. non-finite values ------------------------------------------------------------------------
def test_3_non_finite_values_are_refused(ck, exported, tmp_path):
    nan_weights = copy_checkpoint(ck, tmp_path / "nan_weights")
    state = dict(make_model(CFG).state_dict())
    state["trunks.0.layers.0.attn.wq.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file
    save_file(state, str(nan_weights / "model.safetensors"))
    refused("model.safetensors: non-finite weights (NaN or inf) in 1 tensor(s): "
            "trunks.0.layers.0.attn.wq.weight", "export", nan_weights, "-o", tmp_path / "b1")
    nan_theta = copy_checkpoint(ck, tmp_path / "nan_theta")
    config = json.loads((nan_theta / "config.json").read_text())
    (nan_theta / "config.json").write_text(json.dumps(config | {"rope_theta": float("nan")}))
    for command in ("inspect", "export"):
        extra = ["-o", tmp_path / "b2"] if command == "export" else []
        refused("config.json: config field rope_theta=nan: must be a finite number", command,
                nan_theta, *extra)
    refused("rope_theta=inf: must be a finite number", "init", "--preset", "tiny", "-o",
            tmp_path / "c", "--set", "rope_theta=inf")
    refused("--atol nan: tolerances must be finite", "validate", exported, "--atol", "nan")
    refused("--rtol inf: tolerances must be finite", "validate", exported, "--rtol", "inf")
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")):
        refused(f"({flag})", "run", exported, "--ids", "1,2", flag, value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_theta", "nan_weights"]


# ---- 4. tokenizers -------------------------------------------------------------------------------
def test_4_tokenizers_are_checked_at_export_and_at_load(ck, bundle, tmp_path, text):
    from stagcompile.tokenizer import train_tokenizer
    corrupt = copy_checkpoint(ck, tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    refused("corrupt/tokenizer.json: not a tokenizers JSON file", "export", corrupt, "-o",
            tmp_path / "b1")
    big = copy_checkpoint(ck, tmp_path / "big")
    (big / "tokenizer.json").write_text(train_tokenizer(text.read_text(), 300).to_str())
    refused("big/tokenizer.json: the tokenizer has 300 tokens, more than the model's "
            "vocab_size=97", "export", big, "-o", tmp_path / "b2")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()
    (bundle / "tokenizer.json").write_text("{broken")

    def add_tokenizer(m):
        m["tokenizer"] = "tokenizer.json"
        m["files"]["tokenizer.json"] = checksum(bundle / "tokenizer.json")
    rewrite(bundle, add_tokenizer)
    refused("b/tokenizer.json: not a tokenizers JSON file", "run", bundle, "--ids", "1,2")
    proc = subprocess.run([sys.executable, str(bundle / "runtime" / "run.py"), "--ids", "1,2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and \
        len(proc.stderr.strip().splitlines()) == 1 and "tokenizer.json" in proc.stderr


def checksum(path: Path) -> str:
    from stagcompile.runtime.bundle import sha256
    return sha256(path)


# ---- 5. the manifest -----------------------------------------------------------------------------
def escape_graph(m):
    m["graphs"]["portable"][0]["file"] = "../../elsewhere/stack1.onnx"


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("io"), "manifest.json: field io is missing"),
    (lambda m: m.pop("files"), "manifest.json: field files is missing"),
    (lambda m: m["config"].update(num_stacks=3), "field graphs.portable has 2 entries; expected "
                                                 "one per stack"),
    (escape_graph, "field graphs.portable[0].file '../../elsewhere/stack1.onnx' is not a path "
                   "inside the bundle"),
    (lambda m: m.update(manifest_version=99), "manifest_version 99 is newer than this "
                                              "stagcompile"),
    (lambda m: m["files"].pop("graphs/portable/stack2.onnx"),
     "field graphs.portable[1].file 'graphs/portable/stack2.onnx' has no checksum in files"),
])
def test_5_manifest_schema(bundle, edit, needle):
    rewrite(bundle, edit)
    refused(needle, "run", bundle, "--ids", "1,2")


def test_5_manifest_checksum_links_and_versions(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"max_batch": 64}))
    refused("does not match its manifest_sha256", "run", bundle, "--ids", "1,2")
    (bundle / "manifest.json").write_text(json.dumps([manifest]))
    refused("not a stagcompile manifest", "run", bundle, "--ids", "1,2")
    Bundle(bundle, manifest).write_manifest()
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "graphs" / "portable" / "stack1.onnx", outside)
    (bundle / "graphs" / "portable" / "stack1.onnx").symlink_to(outside)
    refused("field files['graphs/portable/stack1.onnx'] points outside the bundle", "run", bundle,
            "--ids", "1,2")
    (bundle / "graphs" / "portable" / "stack1.onnx").unlink()
    shutil.move(outside, bundle / "graphs" / "portable" / "stack1.onnx")
    rewrite(bundle, lambda m: m["versions"].update(stagcompile="9.0.0"))
    res = cli("run", bundle, "--ids", "1,2", "-n", "2")
    assert res.exit_code == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "written by stagcompile 9.0.0, newer than this one" in warnings[0]


# ---- 6. tracebacks that became one line ----------------------------------------------------------
def test_6_run_errors(bundle):
    def wrong_capacity(m):              # in both I/O tables: the ort and the portable flavour's
        for io in (m["io"][1], m["ort"]["io"][1]):
            for t in io["inputs"]:
                if t["name"] == "self.k.0":
                    t["shape"][2] += 8
    rewrite(bundle, wrong_capacity)
    for flavour in ("ort", "portable"):
        res = refused("stack 2 graph failed on the prompt (ort backend, prefill of positions "
                      "0..1): ", "run", bundle, "--ids", "1,2", "--schedule", "sequential",
                      "--flavour", flavour)
        assert "invalid dimensions for input: self.k.0" in res.stderr, res.stderr
    refused("--ids: token id 99999999999999999999 is out of range", "run", bundle, "--ids",
            "1,99999999999999999999")


def test_6_init_with_absurd_sizes(tmp_path):
    refused("--set vocab_size=10^12: expected an integer", "init", "--preset", "tiny", "-o",
            tmp_path / "x", "--set", "vocab_size=10^12")
    refused("vocab_size=1000000000000: must be <= 2147483647", "init", "--preset", "tiny", "-o",
            tmp_path / "x", "--set", "vocab_size=1000000000000")
    refused("cannot be allocated here", "init", "--preset", "tiny", "-o", tmp_path / "x",
            "--set", "vocab_size=2000000000", "--set", "d_model=1024", "--set", "n_heads=8",
            "--set", "n_kv_heads=8")
    assert list(tmp_path.iterdir()) == []


def test_6_build_timing_cache_folder(bundle, tmp_path):
    folder = tmp_path / "caches"
    folder.mkdir()
    refused("--timing-cache", "build", bundle, "--timing-cache", folder)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["b", "caches"]


def test_6_validate_bad_trace_and_unwritable_report(bundle):
    trace = bundle / "validation" / "trace.npz"
    good = trace.read_bytes()
    data = dict(np.load(trace))
    data["prompt"] = np.array([object()], dtype=object)
    np.savez(trace, **data)
    rewrite(bundle, lambda m: m["files"].update({"validation/trace.npz": checksum(trace)}))
    refused("trace.npz: not a readable golden trace", "validate", bundle)
    trace.write_bytes(good)
    rewrite(bundle, lambda m: m["files"].update({"validation/trace.npz": checksum(trace)}))
    (bundle / "validation" / "report.json").mkdir()
    refused("report.json: is a folder; expected a file", "validate", bundle)


# ---- 7. signals and memory -----------------------------------------------------------------------
def interrupted(cmd):
    """Start `cmd`, let it stream some tokens, send SIGINT; (exit status, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdout.read(40)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_7_ctrl_c_prints_the_summary(exported):
    for cmd in ([sys.executable, str(exported / "runtime" / "run.py")], [EXE, "run", exported]):
        code, err = interrupted([*map(str, cmd), "--ids", "1,2,3", "-n", "10000000"])
        assert code == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(
            "stopped: interrupted"), err


def test_7_sigterm_during_export_leaves_nothing(ck, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([EXE, "export", str(ck), "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not list(tmp_path.glob(".out.tmp.*")) and proc.poll() is None:
        time.sleep(0.1)                        # polls for the staging folder; no timing assertion
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_7_streaming_memory_does_not_grow_with_the_tokens(exported, monkeypatch):
    """What `stagcompile run` (one streamed row) holds when it prints the summary is the same
    for 200 and 1200 new tokens: neither the tokens nor the step times are kept (Python
    allocations, counted with tracemalloc)."""
    import stagcompile.runtime.cli as runtime_cli
    held, report = {}, runtime_cli.report

    def measured(gen):
        held[gen.stats.summary()["new_tokens"]] = tracemalloc.get_traced_memory()[0]
        report(gen)
    monkeypatch.setattr(runtime_cli, "report", measured)
    for n in (10, 200, 1200):                 # the first run fills import-time caches
        tracemalloc.start()
        res = cli("run", exported, "--ids", "1,2,3", "-n", n)
        tracemalloc.stop()
        assert res.exit_code == 0 and len(res.stdout.split()) == n, res.stderr
    assert held[1200] - held[200] < 16 * 1024, held


# ---- 8. the command line -------------------------------------------------------------------------
def test_8_command_line(exported, tmp_path, text):
    refused("seed=-5 (--seed): must be >= 0", "run", exported, "--ids", "1,2", "--seed", "-5",
            "--temperature", "1")
    refused("--prompt and --ids: give one of them, not both", "run", exported, "--ids", "1,2",
            "--prompt", "hi")
    refused("give --prompt TEXT or --ids", "run", exported)
    res = cli("run", exported, "--ids", "1,2", "-n", "3", "--spinning")
    assert res.exit_code == 0 and len(res.stdout.split()) == 3, res.stderr
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"stagcompile {__version__}"
    refused("--seed -5: must be >= 0", "train", text, "-o", tmp_path / "t", "--preset", "tiny",
            "--seed", "-5")
    res = cli("train", text, "-o", tmp_path / "t", "--preset", "tiny", "--steps", "1",
              "--batch-size", "2", "--eval-every", "1")
    assert res.exit_code == 0, res.stderr
    assert "--vocab-size" not in res.stderr and "--seq-len" not in res.stderr
