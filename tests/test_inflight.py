"""In-flight batching: requests of any prompt length join and leave a session at any step, with
their own sampling, stop ids and max tokens, and get exactly the tokens of running each alone
(both schedules, the ort flavour's in-place caches and the portable flavour's rings, rows reused
after other requests left them dirty)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bundle_for, grouped, VARIANTS
from stagcompile.config import preset
from stagcompile.runtime import BundleError, Generator, Sampling
from stagcompile.runtime.inflight import Batcher, Request

FLAVOURS = pytest.mark.parametrize("flavour", ["ort", "portable"])
CHUNK = 4


def alone(path, flavour: str, req: Request) -> list[int]:
    gen = Generator.load(path, flavour=flavour)
    gen.scheduler.prefill_chunk = CHUNK
    stop = req.stop_ids[0] if req.stop_ids else None
    out = gen.generate(np.array([req.ids]), req.max_new_tokens, req.sampling, stop)[0]
    gen.close()
    return [int(t) for t in out]


def requests(cfg, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (length, new) in enumerate([(5, 9), (1, 6), (13, 4), (7, 12), (2, 3), (9, 8), (3, 10)]):
        sampling = Sampling(temperature=0.9, top_k=20, seed=i) if i % 3 == 1 else Sampling()
        out.append(Request(list(rng.integers(0, cfg.vocab_size, length)), new, sampling))
    return out


@FLAVOURS
@pytest.mark.parametrize("schedule", ["staggered", "sequential"])
@pytest.mark.parametrize("cfg", grouped([VARIANTS[-1], VARIANTS[4]]))
def test_inflight_tokens_equal_running_each_request_alone(bundle_root, cfg, flavour, schedule):
    path, _ = bundle_for(bundle_root, cfg)
    reqs = requests(cfg)
    want = [alone(path, flavour, r) for r in reqs]
    reqs[3].stop_ids = (want[3][4],)              # stops early on its own stop id
    want[3] = alone(path, flavour, reqs[3])
    assert len(want[3]) < reqs[3].max_new_tokens
    gen = Generator.load(path, schedule=schedule, flavour=flavour)
    batcher = Batcher(gen, max_batch=3, prefill_chunk=CHUNK)
    for r in reqs[:4]:
        batcher.submit(r)
    seen_batches = set()
    for _ in range(5):                             # the others join mid-generation
        batcher.step()
        seen_batches.add(batcher.active)
    for r in reqs[4:]:
        batcher.submit(r)
    while batcher.step():
        seen_batches.add(batcher.active)
    assert 3 in seen_batches, seen_batches           # rows were shared and reused
    for i, (r, w) in enumerate(zip(reqs, want)):
        assert r.tokens == w, (i, r.finish_reason)
        assert r.finish_reason == ("stop" if i == 3 else "length")
    assert batcher.active == 0 and batcher.queue_depth == 0
    gen.close()


@pytest.mark.parametrize("flavour", ["ort"])
def test_cancelled_and_failing_requests_leave_others_unaffected(bundle_root, flavour):
    cfg = VARIANTS[-1]
    path, _ = bundle_for(bundle_root, cfg)
    reqs = requests(cfg, seed=1)[:3]
    want = [alone(path, flavour, r) for r in reqs]
    gen = Generator.load(path, flavour=flavour)
    batcher = Batcher(gen, max_batch=2, prefill_chunk=CHUNK)
    victim = batcher.submit(Request([1, 2, 3], 50))
    for r in reqs:
        batcher.submit(r)
    for _ in range(3):
        batcher.step()
    batcher.cancel(victim)

    def broken(req, token):
        raise ConnectionError("client gone")

    failing = batcher.submit(Request([4, 5], 9, on_token=broken))
    original = batcher.scheduler.run_prefill

    def prefill(chunk, pos, rows):
        if chunk.shape[1] == 1 and chunk[0, 0] == 7:
            raise RuntimeError("stack 1 graph failed (test)")
        return original(chunk, pos, rows)

    batcher.scheduler.run_prefill = prefill
    crashed = batcher.submit(Request([7], 5))
    batcher.run_until_idle()
    assert crashed.finish_reason == "error" and "stack 1 graph failed" in crashed.error
    assert victim.finish_reason == "cancelled" and victim.done.is_set()
    assert failing.finish_reason == "error" and "client gone" in failing.error
    assert [r.tokens for r in reqs] == want
    gen.close()


def test_threaded_batcher_serves_concurrent_submits(bundle_root):
    cfg = VARIANTS[-1]
    path, _ = bundle_for(bundle_root, cfg)
    reqs = requests(cfg, seed=2)
    want = [alone(path, "ort", r) for r in reqs]
    gen = Generator.load(path)
    batcher = Batcher(gen, prefill_chunk=CHUNK)
    batcher.start()
    for r in reqs:
        batcher.submit(r)
    assert all(r.done.wait(120) for r in reqs)
    batcher.close()
    assert [r.tokens for r in reqs] == want
    gen.close()


def test_capacity_and_bad_requests(bundle_root):
    cfg = preset("tiny").replace(max_seq_len=16)
    path, _ = bundle_for(bundle_root, cfg)
    gen = Generator.load(path)
    batcher = Batcher(gen, max_batch=2)
    full = batcher.submit(Request(list(range(14)), 50))
    batcher.run_until_idle()
    assert len(full.tokens) == 3 and full.finish_reason == "length"
    assert full.tokens == alone(path, "ort", Request(list(range(14)), 50))
    for req, msg in [(Request([], 4), "prompt: empty"),
                     (Request([1, 97], 4), r"token id 97 is out of range \[0, 97\)"),
                     (Request(list(range(17)), 4), "17 tokens exceed the capacity"),
                     (Request([1], 0), "max_tokens=0: must be >= 1")]:
        with pytest.raises(ValueError, match=msg):
            batcher.submit(req)
    with pytest.raises(ValueError, match="--max-batch 9: must be in 1..8"):
        Batcher(gen, max_batch=9)
    gen.close()
    with pytest.raises(BundleError, match="in-flight batching runs on the ort backend"):
        Batcher(type("G", (), {"scheduler": type("S", (), {"backend": type(
            "B", (), {"name": "trt"})()})()})())
