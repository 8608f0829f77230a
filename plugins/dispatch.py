"""Which implementation `stagcompile.layers` calls for BoundedWindowAttention.

The reference by default; `using(fn)` swaps in another callable with the reference's signature
for the duration of a `with` block (export uses it to trace the plugin flavour through the torch
custom op that becomes one `stagformer` ONNX node).
"""

from __future__ import annotations

from contextlib import contextmanager

from plugins.reference import bounded_window_attention

_active = [bounded_window_attention]


def attention(q, k_new, v_new, k_cache, v_cache, pos, window: int, scale: float):
    return _active[-1](q, k_new, v_new, k_cache, v_cache, pos, window, scale)


@contextmanager
def using(fn):
    _active.append(fn)
    try:
        yield
    finally:
        _active.pop()
