"""BoundedWindowAttention: the torch reference's semantics, and the numpy reference, the portable
ONNX expression and the ONNX Runtime plugin kernel agreeing with it; clear errors for bad input."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from plugins import numpy_ref
from plugins.onnx_node import plugin_op, translation_table
from plugins.ort_kernel import session_options
from plugins.portable import to_portable
from plugins.reference import bounded_window_attention as ref
from plugins.spec import AttentionSpecError

NAMES = ["q", "k_new", "v_new", "k_cache", "v_cache", "pos"]


def inputs(b=3, hq=4, hkv=2, s=3, c=6, d=8, pos=(0, 4, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, c, d, generator=g),
            torch.randn(b, hkv, c, d, generator=g), torch.tensor(pos))


def naive(q, k_new, v_new, k_cache, v_cache, pos, window, scale):
    """Position by position, straight from the specification."""
    b, hq, s, d = q.shape
    c, group = k_cache.shape[2], hq // k_new.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kv = h // group
            for si in range(s):
                p = int(pos[bi]) + si
                keys, vals = [], []
                for pp in range(0, p + 1):
                    if window and pp <= p - window:
                        continue
                    if pp >= int(pos[bi]):
                        keys.append(k_new[bi, kv, pp - int(pos[bi])])
                        vals.append(v_new[bi, kv, pp - int(pos[bi])])
                    else:
                        keys.append(k_cache[bi, kv, pp % c])
                        vals.append(v_cache[bi, kv, pp % c])
                w = torch.softmax(torch.stack(keys) @ q[bi, h, si] * scale, 0)
                out[bi, h, si] = w @ torch.stack(vals)
    return out


@pytest.mark.parametrize("window", [0, 1, 3, 7])
def test_reference_matches_the_specification(window):
    args = inputs(c=7 if window == 0 else max(window, 1), pos=(0, 5, 7) if window == 0 else (0, 4, 19))
    torch.testing.assert_close(ref(*args, window, 0.3), naive(*args, window, 0.3), atol=1e-5,
                               rtol=1e-5)


def test_numpy_reference_agrees():
    for window, pos in ((0, (0, 2, 6)), (2, (0, 9, 30)), (5, (1, 5, 17))):
        args = inputs(pos=pos)
        got = numpy_ref.bounded_window_attention(*[a.numpy() for a in args], window, 0.4)
        np.testing.assert_allclose(got, ref(*args, window, 0.4).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def plugin_graph(tmp_path_factory):
    """The op alone as a plugin-flavour ONNX graph (dynamic batch and seq), window 3."""
    op = plugin_op()

    class M(torch.nn.Module):
        def forward(self, q, k_new, v_new, k_cache, v_cache, pos):
            return op(q, k_new, v_new, k_cache, v_cache, pos, 3, 0.35)

    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=64)
    dyn = ({0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch}, {0: batch},
           {0: batch})
    prog = torch.onnx.export(M(), inputs(), dynamo=True, opset_version=18, dynamic_shapes=dyn,
                             input_names=NAMES, output_names=["out"], verbose=False,
                             custom_translation_table=translation_table())
    return prog.model_proto


@pytest.mark.parametrize("pos, seq", [((0, 0, 0), 3), ((1, 5, 20), 1), ((9, 2, 3), 4)])
def test_portable_and_ort_kernel_agree_with_reference(plugin_graph, pos, seq):
    portable = ort.InferenceSession(to_portable(plugin_graph).SerializeToString())
    plugin = ort.InferenceSession(plugin_graph.SerializeToString(), session_options())
    args = inputs(s=seq, pos=pos, seed=seq)
    want = ref(*args, 3, 0.35).numpy()
    feeds = {n: a.numpy() for n, a in zip(NAMES, args)}
    for sess in (portable, plugin):
        np.testing.assert_allclose(sess.run(None, feeds)[0], want, atol=1e-5)
    assert all(n.domain in ("", "ai.onnx") for n in to_portable(plugin_graph).graph.node)


def test_bad_input_is_named():
    q, kn, vn, kc, vc, pos = inputs()
    with pytest.raises(AttentionSpecError, match="input k_new: expected shape"):
        ref(q, kn[:, :, :2], vn, kc, vc, pos)
    with pytest.raises(AttentionSpecError, match="query heads must be a multiple"):
        ref(q[:, :3], kn, vn, kc, vc, pos)
    with pytest.raises(AttentionSpecError, match="input v_cache: dtype float16 differs"):
        ref(q, kn, vn, kc, vc.half(), pos)
    with pytest.raises(AttentionSpecError, match="input pos: dtype float32 not supported"):
        ref(q, kn, vn, kc, vc, pos.float())
    with pytest.raises(AttentionSpecError, match="window=-1"):
        ref(q, kn, vn, kc, vc, pos, -1)
    with pytest.raises(AttentionSpecError, match="capacity C=6 is smaller"):
        ref(q, kn, vn, kc, vc, pos, 9)
    with pytest.raises(AttentionSpecError, match="unbounded attention|pos = 11"):
        ref(q, kn, vn, kc, vc, pos, 0)
    with pytest.raises(AttentionSpecError, match="expected rank 4"):
        numpy_ref.bounded_window_attention(q.numpy()[0], kn.numpy(), vn.numpy(), kc.numpy(),
                                           vc.numpy(), pos.numpy())
