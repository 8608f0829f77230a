"""The runtime: both schedules reproduce the reference token for token on the ort flavour (caches
updated in place by the graphs) and the portable one (ring caches the runtime commits), graphs
never read what a concurrent graph writes, it runs without torch or stagcompile, bounded windows
run in constant memory past max_seq_len, and bad bundles or requests are refused with clear
errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import bundle_for, grouped, VARIANTS
from stagcompile.config import preset
from stagcompile.generate import cached_generate
from stagcompile.runtime import BundleError, CapacityError, Generator
from stagcompile.runtime.sampling import Sampler, Sampling
from stagcompile.runtime.stats import KEEP, Stats

NEW = 14
FLAVOURS = pytest.mark.parametrize("flavour", ["ort", "portable"])


def reference(model, prompt: np.ndarray, n: int):
    toks, logits = cached_generate(model, torch.from_numpy(prompt), n)
    return toks.numpy(), torch.stack(logits, 1).numpy()


def runtime_logits(gen: Generator, prompt: np.ndarray, n: int):
    """Greedy tokens and the logits that chose them, through the runtime's prefill/step."""
    logits = gen.prefill(prompt)
    toks, all_logits = [], []
    for i in range(n):
        all_logits.append(logits.copy())
        toks.append(logits.argmax(-1))
        if i + 1 < n:
            logits = gen.step(toks[-1])
    return np.stack(toks, 1), np.stack(all_logits, 1)


@FLAVOURS
@pytest.mark.parametrize("batch", [1, 3])
def test_schedules_match_reference(bundle_root, variant, batch, flavour):
    path, model = bundle_for(bundle_root, variant)
    prompt = np.random.default_rng(batch).integers(0, variant.vocab_size, (batch, 5))
    want_toks, want_logits = reference(model, prompt, NEW)
    for schedule in ("staggered", "sequential"):
        gen = Generator.load(path, schedule=schedule, flavour=flavour)
        assert gen.scheduler.backend.flavour == flavour
        toks, logits = runtime_logits(gen, prompt, NEW)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
        assert np.array_equal(toks, want_toks), schedule
        assert np.array_equal(gen.generate(prompt, NEW), want_toks)
        gen.close()


@FLAVOURS
@pytest.mark.parametrize("cfg", grouped([VARIANTS[-1]]))
def test_no_graph_reads_what_a_concurrent_graph_writes(bundle_root, cfg, flavour):
    path, model = bundle_for(bundle_root, cfg)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 4))
    clean = Generator.load(path, flavour=flavour)
    _, want = runtime_logits(clean, prompt, 12)
    gen = Generator.load(path, flavour=flavour)
    backend = gen.scheduler.backend
    original = backend.set_step

    def poisoned(tokens, pos):
        st = backend.state
        for k in range(st.num_stacks):            # everything written during this step
            for arr in st.staging[k].values():
                if arr.dtype.kind == "f":
                    arr.fill(np.nan)
            for arr in st.pending[k][1 - pos % 2].values():
                arr.fill(np.nan)
        original(tokens, pos)

    backend.set_step = poisoned
    _, got = runtime_logits(gen, prompt, 12)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    gen.close()
    clean.close()


def test_sampling_is_seeded_and_respects_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    a = Sampler(Sampling(temperature=1.0, seed=3))(logits)
    b = Sampler(Sampling(temperature=1.0, seed=3))(logits)
    assert np.array_equal(a, b)
    assert abs((a == 0).mean() - 0.5) < 0.05
    assert set(Sampler(Sampling(temperature=1.0, top_k=2, seed=0))(logits)) <= {0, 1}
    assert set(Sampler(Sampling(temperature=1.0, top_p=0.7, seed=0))(logits)) <= {0, 1}
    assert set(Sampler(Sampling(temperature=1.0, top_p=0.01, seed=0))(logits)) == {0}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    for kwargs, flag in [({"temperature": float("nan")}, "--temperature"),
                         ({"temperature": float("inf")}, "--temperature"),
                         ({"top_p": float("nan")}, "--top-p"), ({"seed": -5}, "--seed")]:
        with pytest.raises(ValueError, match=flag):
            Sampling(**kwargs)


BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "stagcompile", "graphs", "plugins", "cli"):
                raise ImportError("blocked for this test: " + name)
    sys.meta_path.insert(0, Block())
""")


@pytest.mark.parametrize("cfg", grouped([VARIANTS[4]]))
def test_generated_runtime_runs_without_torch_or_stagcompile(bundle_root, tmp_path, cfg):
    path, model = bundle_for(bundle_root, cfg)
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True,
                           text=True)
    assert check.returncode != 0 and "blocked" in check.stderr
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 5))
    want, _ = reference(model, prompt, 10)
    ids = ",".join(map(str, prompt[0]))
    for cmd, cwd in (([sys.executable, str(path / "runtime" / "run.py")], tmp_path),
                     ([sys.executable, "-m", "runtime"], path)):
        proc = subprocess.run(cmd + ["--ids", ids, "--max-new-tokens", "10"], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(t) for t in want[0]]
        assert "ms/token median" in proc.stderr and "[ort, staggered]" in proc.stderr


@FLAVOURS
def test_bounded_generation_runs_past_max_seq_len_in_constant_memory(bundle_root, flavour):
    psutil = pytest.importorskip("psutil")
    cfg = preset("tiny").replace(max_seq_len=32, self_window=8, cross_window=4)
    path, model = bundle_for(bundle_root, cfg)
    gen = Generator.load(path, flavour=flavour)
    proc = psutil.Process()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4))
    rss = []
    logits = gen.prefill(prompt)
    for i in range(4 * cfg.max_seq_len):
        logits = gen.step(logits.argmax(-1))
        if i % 8 == 0:
            rss.append(proc.memory_info().rss)
    warm = rss[2:]
    assert max(warm) - min(warm) < 2 * 2**20, f"resident memory grew by {max(warm) - min(warm)} B"
    want, _ = reference(model, prompt, 4 * cfg.max_seq_len)
    assert np.array_equal(gen.generate(prompt, 4 * cfg.max_seq_len), want)
    gen.close()


@FLAVOURS
def test_unbounded_model_stops_at_capacity(bundle_root, flavour):
    cfg = preset("tiny").replace(max_seq_len=16)
    path, _ = bundle_for(bundle_root, cfg)
    gen = Generator.load(path, flavour=flavour)
    out = gen.generate(np.zeros((1, 10), np.int64), 50)
    assert out.shape[1] == 7 and "cache full at 16 tokens" in gen.stats.stopped
    with pytest.raises(CapacityError, match="prompt of 17 tokens does not fit"):
        gen.generate(np.zeros((1, 17), np.int64), 2)
    with pytest.raises(ValueError, match="batch 9 exceeds max_batch=8"):
        gen.generate(np.zeros((9, 3), np.int64), 2)
    gen.close()


def test_broken_bundles_are_refused(bundle_root, tmp_path):
    path, _ = bundle_for(bundle_root, preset("tiny"))
    broken = tmp_path / "b"
    shutil.copytree(path, broken)
    data = broken / "graphs" / "portable" / "stack1.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="stack1.onnx.data: checksum mismatch"):
        Generator.load(broken)
    shutil.rmtree(broken)
    shutil.copytree(path, broken)
    (broken / "graphs" / "portable" / "stack2.onnx").unlink()
    with pytest.raises(BundleError, match="stack2.onnx: file listed in manifest.json is missing"):
        Generator.load(broken)
    man = json.loads((broken / "manifest.json").read_text())
    man["manifest_version"] = 0
    (broken / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="manifest_version 0 is not supported"):
        Generator.load(broken)
    with pytest.raises(BundleError, match="file not found"):
        Generator.load(tmp_path / "nothing")


def test_run_command_streams_and_reports(bundle_root):
    path, model = bundle_for(bundle_root, preset("tiny"))
    exe = shutil.which("stagcompile", path=os.path.dirname(sys.executable))
    proc = subprocess.run([exe, "run", str(path), "--ids", "1,2,3", "-n", "6",
                           "--schedule", "sequential"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    want, _ = reference(model, np.array([[1, 2, 3]]), 6)
    assert proc.stdout.split() == [str(t) for t in want[0]]
    assert "[ort, sequential]" in proc.stderr
    bad = subprocess.run([exe, "run", str(path), "--ids", "1,2,300"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "token ids must be in [0, 97)" in bad.stderr
    empty = subprocess.run([exe, "run", str(path), "--ids", ""], capture_output=True, text=True,
                           timeout=300)
    assert empty.returncode == 1 and "give at least one token id per row" in empty.stderr


@FLAVOURS
@pytest.mark.parametrize("cfg", grouped([VARIANTS[-1], VARIANTS[4]]))
def test_chunked_prefill_matches_one_shot(bundle_root, cfg, flavour):
    path, model = bundle_for(bundle_root, cfg)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    want_toks, want_logits = reference(model, prompt, 6)
    for chunk in (1, 2, 3, 4, 11):
        gen = Generator.load(path, schedule="staggered", flavour=flavour)
        gen.scheduler.prefill_chunk = chunk
        toks, logits = runtime_logits(gen, prompt, 6)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
        assert np.array_equal(toks, want_toks), chunk
        gen.close()


def test_stats_are_bounded_and_exact_for_thousands_of_steps():
    rng = np.random.default_rng(0)
    short, long = Stats(batch=1), Stats(batch=1)
    times = rng.lognormal(-6, 0.5, KEEP)
    for t in times:
        short.add_step(t)
    got = short.summary()
    assert got["decode_ms_median"] == pytest.approx(np.median(times) * 1e3, rel=1e-12)
    assert got["decode_ms_p90"] == pytest.approx(np.percentile(times, 90) * 1e3, rel=1e-12)
    assert got["decode_tokens_per_s"] == pytest.approx(KEEP / times.sum(), rel=1e-12)
    many = rng.lognormal(-6, 0.5, 50 * KEEP)
    for t in many:
        long.add_step(t)
    assert long.step_sample.values.nbytes == short.step_sample.values.nbytes == 8 * KEEP
    assert long.steps == len(many) and long.decode_s == pytest.approx(many.sum(), rel=1e-9)
    s = long.summary()      # a uniform sample of 4096: the quantiles land within 2 % here
    assert s["decode_ms_median"] == pytest.approx(np.median(many) * 1e3, rel=0.02)
    assert s["decode_ms_p90"] == pytest.approx(np.percentile(many, 90) * 1e3, rel=0.02)


def test_stack_errors_name_the_stack_and_step():
    from stagcompile.runtime.scheduler import Scheduler, StackError

    class Failing:
        name, concurrency, ios = "fake", "threads", [{}, {}]

        def open(self, batch):
            pass

        def prefill(self, ids, pos):
            for k in range(2):
                if k == 1:
                    raise RuntimeError("[Fake] bad\ninput shape")
            return np.zeros((1, 4), np.float32)

        def set_step(self, tokens, pos):
            pass

        def launch(self, k, parity):
            if k == 1:
                raise RuntimeError("[Fake] stack two\nbroke")

        def finish(self):
            return np.zeros((1, 4), np.float32)

        def close(self):
            pass

    for schedule in ("staggered", "sequential"):
        sched = Scheduler(Failing(), schedule, 64, False)
        sched.start(1)
        with pytest.raises(StackError, match=r"^stack 2 graph failed on the prompt \(fake "
                                             r"backend, prefill of positions 0..2\): \[Fake\] "
                                             r"bad input shape$"):
            sched.prefill(np.zeros((1, 3), np.int64))
        sched.pos = 3
        with pytest.raises(StackError, match=r"^stack 2 graph failed \(fake backend, decode step "
                                             r"at position 3\): \[Fake\] stack two broke$"):
            sched.step(np.zeros(1, np.int64))
        with pytest.raises(StackError, match=r"^stack 2 graph failed \(fake backend, decode step "
                                             r"of 2 rows at positions 3..5\): \[Fake\] stack two "
                                             r"broke$"):
            sched.run_step(np.zeros(2, np.int64), np.array([3, 5]), 1)
        sched.close()

