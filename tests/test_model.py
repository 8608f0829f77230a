"""The reference model: teacher-forced == cached decoding for every variant (cross-gated ones
too), staggering, the zero cross gate, init depth, shared-weight parameter counts, recurrent
decoding, naive == cached greedy generation."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from stagcompile.config import preset
from stagcompile.generate import (CachedDecoder, cached_generate, naive_generate,
                                  recurrent_reference_logits)
from stagcompile.model import StagFormer, count_parameters

PROMPT = 5


def _length(cfg) -> int:
    """Long enough that every bounded ring wraps at least twice after the prompt."""
    windows = [w for w in (cfg.self_window, cfg.cross_window) if w]
    return min(cfg.max_seq_len, max([20] + [PROMPT + 2 * w + 3 for w in windows]))


GATED = [preset("tiny").replace(cross_gate=True),
         preset("tiny").replace(num_stacks=3, cross_gate=True, cross_window=4, self_window=8),
         preset("tiny").replace(shared_weights=True, cross_gate=True, cross_window=1)]


def _teacher_forced_equals_cached(cfg):
    model = make_model(cfg)
    t = _length(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, t), generator=torch.Generator().manual_seed(3))
    ref = model(ids)
    dec = CachedDecoder(model, 2)
    got = [dec.prefill(ids[:, :PROMPT])]
    for i in range(PROMPT, t):
        got.append(dec.step(ids[:, i])[:, None])
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-5, rtol=0)


def test_teacher_forced_equals_cached(variant):
    _teacher_forced_equals_cached(variant)


@pytest.mark.parametrize("cfg", GATED, ids=["P2", "P3-cw4-sw8", "P2-shared-cw1"])
def test_gated_teacher_forced_equals_cached(cfg):
    _teacher_forced_equals_cached(cfg)


@pytest.mark.parametrize("cross_gate", [False, True])
@pytest.mark.parametrize("num_stacks", [2, 3])
@pytest.mark.parametrize("cross_window", [None, 3])
def test_staggering(num_stacks, cross_window, cross_gate):
    cfg = preset("tiny").replace(num_stacks=num_stacks, cross_window=cross_window,
                                 cross_gate=cross_gate)
    model = make_model(cfg)
    t, i = 12, 6
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(1))
    base: list = []
    model(ids, stack_outputs=base)
    for k in range(1, num_stacks):
        late = torch.zeros(1, t, cfg.d_model)
        late[:, i:] = 5.0
        outs: list = []
        model(ids, perturb={k - 1: late}, stack_outputs=outs)
        torch.testing.assert_close(outs[k][:, : i + 1], base[k][:, : i + 1], atol=0, rtol=0)
        assert not torch.allclose(outs[k][:, i + 1], base[k][:, i + 1])
        prev = torch.zeros(1, t, cfg.d_model)
        prev[:, i - 1] = 5.0
        outs = []
        model(ids, perturb={k - 1: prev}, stack_outputs=outs)
        torch.testing.assert_close(outs[k][:, :i], base[k][:, :i], atol=0, rtol=0)
        assert not torch.allclose(outs[k][:, i], base[k][:, i], atol=1e-4)


def test_zero_gate_cuts_the_memory():
    """With every cross gate at zero (its init) a consumer stack's output does not depend on the
    memory at all; with one gate open it does."""
    cfg = preset("tiny").replace(num_stacks=3, cross_gate=True)
    model = make_model(cfg)
    gates = [cl.gate for cs in model.crosses for cl in cs.layers]
    assert [g.shape for g in gates] == [torch.Size([1])] * 4
    with torch.no_grad():
        for g in gates:
            g.zero_()
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    noise = {k: torch.randn(2, 10, cfg.d_model) for k in range(2)}
    base: list = []
    model(ids, stack_outputs=base)
    outs: list = []
    model(ids, perturb=noise, stack_outputs=outs)
    for k in range(3):
        torch.testing.assert_close(outs[k], base[k], atol=0, rtol=0)
    with torch.no_grad():
        model.crosses[1].layers[0].gate.fill_(0.5)
    outs = []
    model(ids, perturb=noise, stack_outputs=outs)
    assert torch.equal(outs[1], base[1]) and not torch.allclose(outs[2], base[2], atol=1e-3)


def test_init_depth_and_zero_gates():
    cfg = preset("tiny").replace(num_stacks=2, layers_per_stack=2, cross_gate=True)
    by_model, by_stack = StagFormer(cfg), StagFormer(cfg)
    by_model.reset_parameters(0)
    by_stack.reset_parameters(0, "stack")
    gates = [n for n, _ in by_model.named_parameters() if n.endswith("gate")]
    assert gates == ["crosses.0.layers.0.gate", "crosses.0.layers.1.gate"]
    stack_params = dict(by_stack.named_parameters())
    for name, prm in by_model.named_parameters():
        if name.endswith(("wo.weight", "w2.weight")):   # 1/sqrt(2 * 2) instead of 1/sqrt(2 * 4)
            torch.testing.assert_close(stack_params[name], prm * 2 ** 0.5)
        else:
            assert torch.equal(stack_params[name], prm), name
        if name.endswith("gate"):
            assert torch.equal(prm, torch.zeros(1))
    with pytest.raises(ValueError, match="init depth 'layer'"):
        by_model.reset_parameters(0, "layer")


@pytest.mark.parametrize("num_stacks", [2, 3])
def test_shared_weight_parameter_count(num_stacks):
    cfg = preset("tiny").replace(num_stacks=num_stacks, shared_weights=True)
    model = StagFormer(cfg)
    d, L = cfg.d_model, cfg.layers_per_stack
    one_stack = count_parameters(StagFormer(cfg.replace(num_stacks=1, shared_weights=False)))
    attn = 2 * d * d + 2 * d * cfg.n_kv_heads * cfg.head_dim
    per_consumer = L * (attn + d) + d            # cross attention + its norm per layer, null slot
    per_producer = d                             # memory norm
    expected = one_stack + (num_stacks - 1) * (per_consumer + per_producer)
    assert count_parameters(model) == expected
    assert len(model.trunks) == 1


def test_recurrent_decoding_matches_from_scratch_reference():
    cfg = preset("tiny").replace(shared_weights=True, cross_window=4, self_window=8)
    model = make_model(cfg)
    t, prompt = 24, 6
    ids = torch.randint(0, cfg.vocab_size, (2, t), generator=torch.Generator().manual_seed(2))
    ref = recurrent_reference_logits(model, ids, prompt)
    dec = CachedDecoder(model, 2, recurrent=True)
    got = [dec.prefill(ids[:, :prompt])]
    for i in range(prompt, t):
        got.append(dec.step(ids[:, i])[:, None])
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-5, rtol=0)
    teacher = model(ids)
    assert not torch.allclose(teacher[:, prompt + 2:], ref[:, prompt + 2:], atol=1e-3)
    toks, _ = cached_generate(model, ids[:, :prompt], 8, recurrent=True)
    seq = torch.cat([ids[:, :prompt], toks], 1)
    again = recurrent_reference_logits(model, seq, prompt)
    assert torch.equal(again[:, prompt - 1:-1].argmax(-1), toks)


def test_recurrent_requires_shared_p2():
    with pytest.raises(ValueError, match="shared_weights=true and num_stacks=2"):
        CachedDecoder(StagFormer(preset("tiny")), 1, recurrent=True)


@pytest.mark.parametrize("num_stacks", [1, 2, 3])
def test_naive_and_cached_generate_agree(num_stacks):
    cfg = preset("tiny").replace(num_stacks=num_stacks, self_window=6)
    model = make_model(cfg, seed=num_stacks)
    ids = torch.randint(0, cfg.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))
    naive, naive_logits = naive_generate(model, ids, 20)
    cached, cached_logits = cached_generate(model, ids, 20)
    assert torch.equal(naive, cached)
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(naive_logits), atol=1e-5,
                               rtol=0)


def test_cached_decode_projects_the_null_slot_only_in_prefill(monkeypatch):
    """Only position 0 reads the null slot M[0]: prefill projects it once per consumer, a
    decode step never (the golden-trace recorder, which must emit every graph output, does)."""
    from stagcompile.golden import record
    cfg = preset("tiny").replace(num_stacks=3)
    model = make_model(cfg)
    calls = []
    original = model.null_entries
    monkeypatch.setattr(model, "null_entries", lambda *a: calls.append(a) or original(*a))
    dec = CachedDecoder(model, 2)
    dec.prefill(torch.zeros(2, 5, dtype=torch.int64))
    assert [c[0] for c in calls] == [1, 2]
    for _ in range(4):
        dec.step(torch.zeros(2, dtype=torch.int64))
    assert len(calls) == 2
    steps, _ = record(model, torch.zeros(1, 5, dtype=torch.int64).numpy(), 3)
    assert all("cross_null.k.0" in st[1]["outputs"] for st in steps)


def test_unbounded_model_stops_at_max_seq_len():
    cfg = preset("tiny").replace(max_seq_len=8)
    dec = CachedDecoder(StagFormer(cfg), 1)
    dec.prefill(torch.zeros(1, 6, dtype=torch.int64))
    dec.step(torch.zeros(1, dtype=torch.int64))
    dec.step(torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        dec.step(torch.zeros(1, dtype=torch.int64))


def test_bounded_model_runs_past_max_seq_len():
    cfg = preset("tiny").replace(max_seq_len=8, self_window=4, cross_window=2)
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    dec = CachedDecoder(model, 1)
    got = [dec.prefill(ids[:, :3])]
    for i in range(3, 30):
        got.append(dec.step(ids[:, i])[:, None])
    torch.testing.assert_close(torch.cat(got, 1), model(ids), atol=1e-5, rtol=0)


def test_loss_is_cross_entropy_of_logits():
    cfg = preset("tiny")
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)
