"""The Triton kernel against the torch reference, on CPU under the Triton interpreter.

Every case poisons the ring slots that no query of its row may read with NaN and compares with the
reference on the clean cache: the kernel must never load them. Tolerances: fp32 2e-5 (same math,
different summation order), fp16 2e-3, bf16 2e-2 (probabilities are rounded to the input dtype
before p @ v in both implementations; block-wise rescaling rounds differently).
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")      # read by triton when it is imported

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel cannot be tested")

from plugins import reference, spec, triton_kernel  # noqa: E402
from plugins.triton_kernel import bounded_window_attention_triton  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def mode(request):
    """CPU tests need triton in interpreter mode, gpu tests in native mode (one per process)."""
    interpreting = triton_kernel.interpreter_mode()
    if request.node.get_closest_marker("gpu"):
        if interpreting:
            pytest.skip("triton was imported with TRITON_INTERPRET=1; run the gpu tests with "
                        "TRITON_INTERPRET=0")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    elif not interpreting:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: CPU tests need the "
                    "interpreter")


def make_case(seed, batch, q_heads, kv_heads, seq, head_dim, window, dtype, device="cpu"):
    """Random inputs whose positions cover 0 and ring wrap-around (pos > C), one per row."""
    g = torch.Generator().manual_seed(seed)
    if window:
        capacity = max(window - 1, 1) + int(torch.randint(0, 3, (), generator=g))
        pos = torch.randint(0, 3 * capacity + 2, (batch,), generator=g)
    else:
        pos = torch.randint(0, 12, (batch,), generator=g)
        capacity = int(pos.max()) + int(torch.randint(0, 3, (), generator=g))
    pos[0] = 0
    if batch > 2:
        pos[1] = 2 * capacity + 1                   # wraps the ring twice
    if not window:
        capacity = max(capacity, int(pos.max()))

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    return (rand(batch, q_heads, seq, head_dim), rand(batch, kv_heads, seq, head_dim),
            rand(batch, kv_heads, seq, head_dim), rand(batch, kv_heads, capacity, head_dim),
            rand(batch, kv_heads, capacity, head_dim), pos.to(device))


def poison_unread_slots(k_cache, v_cache, pos, window):
    """NaN in every ring slot outside the union of the row's query windows."""
    k, v = k_cache.clone(), v_cache.clone()
    capacity = k.shape[2]
    for b, p in enumerate(pos.tolist()):
        lo = max(0, p - window + 1) if window else 0
        read = {q % capacity for q in range(lo, p)}
        for slot in set(range(capacity)) - read:
            k[b, :, slot] = float("nan")
            v[b, :, slot] = float("nan")
    return k, v


def check(case, window, scale=None):
    q, kn, vn, kc, vc, pos = case
    kc_bad, vc_bad = poison_unread_slots(kc, vc, pos, window)
    got = bounded_window_attention_triton(q, kn, vn, kc_bad, vc_bad, pos, window=window,
                                          scale=scale)
    want = reference.bounded_window_attention(q, kn, vn, kc, vc, pos, window=window, scale=scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert not torch.isnan(got).any()
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 1, 3, 40])
@pytest.mark.parametrize("seq", [1, 7])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_matches_reference(dtype, window, seq, group):
    seed = 1000 * list(TOL).index(dtype) + 100 * window + 10 * seq + group
    kv_heads = 2 if group < 4 else 1
    head_dim = {1: 16, 2: 48, 4: 8}[group]
    check(make_case(seed, 3, kv_heads * group, kv_heads, seq, head_dim, window, dtype), window)


@pytest.mark.parametrize("window,seq,head_dim", [(5, 20, 64), (0, 19, 128), (16, 33, 32)])
def test_long_prefill(window, seq, head_dim):
    """Several query blocks and key blocks per program; rows of a block cross block edges."""
    check(make_case(7, 2, 4, 2, seq, head_dim, window, torch.float32), window, scale=0.3)


def test_decode_many_heads_pads_rows():
    """G = 12 decode rows in one block of 16: the padding rows must not disturb the others."""
    check(make_case(3, 2, 12, 1, 1, 16, 6, torch.float16), 6)


def test_out_argument_and_int32_pos():
    q, kn, vn, kc, vc, pos = make_case(11, 2, 4, 2, 3, 16, 4, torch.float32)
    out = torch.full_like(q, float("nan"))
    got = bounded_window_attention_triton(q, kn, vn, kc, vc, pos.to(torch.int32), window=4, out=out)
    assert got is out
    want = reference.bounded_window_attention(q, kn, vn, kc, vc, pos, window=4)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    with pytest.raises(spec.AttentionSpecError, match="out must be"):
        bounded_window_attention_triton(q, kn, vn, kc, vc, pos, window=4, out=out.half())


def _bad_inputs():
    q, kn, vn, kc, vc, pos = make_case(5, 2, 4, 2, 2, 16, 4, torch.float32)
    cases = {
        "kv_heads": ((q, kn[:, :1], vn, kc, vc, pos), {"window": 4}),
        "heads": ((q[:, :3], kn, vn, kc, vc, pos), {"window": 4}),
        "dtype": ((q, kn.half(), vn, kc, vc, pos), {"window": 4}),
        "pos_dtype": ((q, kn, vn, kc, vc, pos.float()), {"window": 4}),
        "rank": ((q, kn, vn, kc, vc, pos[:, None]), {"window": 4}),
        "window": ((q, kn, vn, kc, vc, pos), {"window": -1}),
        "scale": ((q, kn, vn, kc, vc, pos), {"window": 4, "scale": 0.0}),
        "capacity": ((q, kn, vn, kc[:, :, :1], vc[:, :, :1], pos + 5), {"window": 4}),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("args,kwargs", _bad_inputs())
def test_bad_input_same_message_as_reference(args, kwargs):
    with pytest.raises(spec.AttentionSpecError) as want:
        reference.bounded_window_attention(*args, **kwargs)
    with pytest.raises(spec.AttentionSpecError) as got:
        bounded_window_attention_triton(*args, **kwargs)
    assert str(got.value) == str(want.value)


def test_odd_head_dim_rejected():
    q, kn, vn, kc, vc, pos = make_case(5, 1, 2, 2, 1, 16, 4, torch.float32)
    cut = [t[..., :15] for t in (q, kn, vn, kc, vc)]
    with pytest.raises(spec.AttentionSpecError, match="head dim D=15"):
        bounded_window_attention_triton(*cut, pos, window=4)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_kernel, "interpreter_mode", lambda: False)
    case = make_case(5, 1, 2, 2, 1, 16, 4, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        bounded_window_attention_triton(*case, window=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window,seq", [(0, 1), (64, 1), (64, 37), (1, 5)])
def test_native_gpu(dtype, window, seq):
    case = make_case(1, 3, 8, 2, seq, 128, window, dtype, device="cuda")
    check(case, window)
