"""The torch reference of BoundedWindowAttention: the definition every other implementation matches.

It is written with plain tensor operations and a mask computed from `pos`: scores against the
ring and against the new entries, one softmax over both, never a copy of the cache. It costs
O(C + S) per query (it scores every ring slot and masks); the Triton kernel is the O(window)
implementation, and `plugins.portable` is the same computation in ONNX operators.

Ring slot c holds position  pos - 1 - ((pos + C - 1 - c) mod C),  the latest position before pos
that maps to slot c; negative means "never written". All operands of the mod are >= 0 so ONNX
Mod, TensorRT and torch agree.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from plugins import spec


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_inputs(q, k_new, v_new, k_cache, v_cache, pos, window: int, scale: float) -> spec.Dims:
    dims = spec.check_shapes(tuple(q.shape), tuple(k_new.shape), tuple(v_new.shape),
                             tuple(k_cache.shape), tuple(v_cache.shape), tuple(pos.shape))
    spec.check_dtypes(*(_dtype_name(t) for t in (q, k_new, v_new, k_cache, v_cache, pos)))
    spec.check_attrs(window, scale)
    return dims


def key_positions(pos: torch.Tensor, capacity: int, seq: int) -> torch.Tensor:
    """[B, C + S]: absolute position of every ring slot followed by every new entry."""
    slots = torch.arange(capacity, device=pos.device)                         # [C]
    p = pos.to(torch.int64)[:, None]                                          # [B, 1]
    cache_pos = p - 1 - torch.remainder(p + capacity - 1 - slots[None, :], capacity)  # [B, C]
    new_pos = p + torch.arange(seq, device=pos.device)[None, :]               # [B, S]
    return torch.cat([cache_pos, new_pos], dim=1)


_mask_memo: list[dict] = []


@contextmanager
def shared_masks():
    """Within the block, calls with the same `pos` tensor, capacity, length and window reuse one
    mask (a stack step builds each distinct mask once instead of once per layer)."""
    _mask_memo.append({})
    try:
        yield
    finally:
        _mask_memo.pop()


def attention_mask(pos: torch.Tensor, capacity: int, seq: int, window: int) -> torch.Tensor:
    """[B, 1, S, C + S] bool: True where query s may attend key j."""
    if _mask_memo:
        key = (id(pos), capacity, seq, window)
        memo = _mask_memo[-1]
        if key not in memo:
            memo[key] = (pos, _build_mask(pos, capacity, seq, window))
        return memo[key][1]
    return _build_mask(pos, capacity, seq, window)


def _build_mask(pos: torch.Tensor, capacity: int, seq: int, window: int) -> torch.Tensor:
    kpos = key_positions(pos, capacity, seq)                                  # [B, C + S]
    qpos = pos.to(torch.int64)[:, None] + torch.arange(seq, device=pos.device)[None, :]  # [B, S]
    k = kpos[:, None, :]                                                      # [B, 1, C + S]
    q = qpos[:, :, None]                                                      # [B, S, 1]
    valid = (k <= q) & (k >= 0)
    if window:
        valid = valid & (k > q - window)
    return valid[:, None]                                                     # [B, 1, S, C + S]


def bounded_window_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                             window: int = 0, scale: float | None = None) -> torch.Tensor:
    """See `plugins` for the specification. Returns [B, Hq, S, D] in q's dtype."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not torch.compiler.is_compiling():
        dims = check_inputs(q, k_new, v_new, k_cache, v_cache, pos, window, scale)
        if pos.numel():
            spec.check_capacity(dims.capacity, window, int(pos.max()))
    b, hq, s, d = q.shape
    hkv, c = k_new.shape[1], k_cache.shape[2]
    group = hq // hkv
    qg = q.reshape(b, hkv, group * s, d)                                      # [B, Hkv, G*S, D]
    scores = torch.cat([torch.matmul(qg, k_cache.transpose(-1, -2)),          # [B, Hkv, G*S, C]
                        torch.matmul(qg, k_new.transpose(-1, -2))], dim=-1)   # ++ [.., S]
    scores = scores.float().reshape(b, hkv, group, s, c + s) * scale          # [B, Hkv, G, S, C+S]
    mask = attention_mask(pos, c, s, window)[:, :, None]                      # [B, 1, 1, S, C+S]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    probs = probs.reshape(b, hkv, group * s, c + s)                           # [B, Hkv, G*S, C+S]
    out = (torch.matmul(probs[..., :c], v_cache)
           + torch.matmul(probs[..., c:], v_new))                             # [B, Hkv, G*S, D]
    return out.reshape(b, hq, s, d)                                           # [B, Hq, S, D]
