"""BoundedWindowAttention in numpy: the same definition as `plugins.reference`, without torch.

Used by the ONNX Runtime kernel (`plugins.ort_kernel`) and anywhere torch is absent (validation
on a Jetson). It follows the reference line by line: key positions of ring slots and new
entries, a mask from `pos`, an fp32 softmax.
"""

from __future__ import annotations

import numpy as np

from plugins import spec


def key_positions(pos: np.ndarray, capacity: int, seq: int) -> np.ndarray:
    """[B, C + S] absolute positions of every ring slot, then every new entry."""
    p = pos.astype(np.int64)[:, None]                                        # [B, 1]
    slots = np.arange(capacity, dtype=np.int64)[None, :]                     # [1, C]
    cache_pos = p - 1 - np.remainder(p + capacity - 1 - slots, capacity) if capacity else \
        np.zeros((len(pos), 0), np.int64)                                    # [B, C]
    return np.concatenate([cache_pos, p + np.arange(seq)[None, :]], axis=1)


def bounded_window_attention(q, k_new, v_new, k_cache, v_cache, pos, window: int = 0,
                             scale: float | None = None) -> np.ndarray:
    dims = spec.check_shapes(q.shape, k_new.shape, v_new.shape, k_cache.shape, v_cache.shape,
                             pos.shape)
    spec.check_dtypes(*(str(a.dtype) for a in (q, k_new, v_new, k_cache, v_cache, pos)))
    scale = dims.head_dim ** -0.5 if scale is None else float(scale)
    spec.check_attrs(int(window), scale)
    if pos.size:
        spec.check_capacity(dims.capacity, int(window), int(pos.max()))
    b, hq, s, d = q.shape
    hkv, c, g = dims.kv_heads, dims.capacity, dims.group
    keys = np.concatenate([k_cache, k_new], axis=2).astype(np.float32)      # [B, Hkv, C+S, D]
    values = np.concatenate([v_cache, v_new], axis=2).astype(np.float32)    # [B, Hkv, C+S, D]
    qg = q.astype(np.float32).reshape(b, hkv, g * s, d)                      # [B, Hkv, G*S, D]
    scores = (qg @ keys.transpose(0, 1, 3, 2)) * np.float32(scale)         # [B, Hkv, G*S, C+S]
    scores = scores.reshape(b, hkv, g, s, c + s)                             # [B, Hkv, G, S, C+S]
    kpos = key_positions(pos, c, s)[:, None, None, None, :]                  # [B, 1, 1, 1, C+S]
    qpos = (pos.astype(np.int64)[:, None] + np.arange(s))[:, None, None, :, None]  # [B,1,1,S,1]
    valid = (kpos <= qpos) & (kpos >= 0)
    if window:
        valid &= kpos > qpos - window
    scores = np.where(valid, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs.reshape(b, hkv, g * s, c + s) @ values                       # [B, Hkv, G*S, D]
    return out.reshape(b, hq, s, d).astype(q.dtype)                          # [B, Hq, S, D]
