"""Llama-style building blocks of the reference model: RMSNorm, RoPE, attention projections, SwiGLU.

Conventions: activations are [B, S, d_model]; per-head tensors are [B, H, S, head_dim]; positions
are int64 [B, S] absolute token positions. RoPE angles are computed from positions on the fly,
once per step (float32 position * inverse frequency), so bounded-window models can run past max_seq_len and the
exported graphs compute exactly what the reference computes. Norms, RoPE and softmax run in fp32
whatever the weight dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from plugins.dispatch import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written as x / sqrt(mean(x^2) + eps) * w: ONNX Runtime fuses this exported pattern
        # into one SimplifiedLayerNormalization kernel
        xf = x.float()
        xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """(cos, sin) [B, 1, S, D/2] in fp32 for positions [B, S]; computed once per step."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device,
                                       dtype=torch.float32) / head_dim)      # [D/2]
    angles = positions.float()[:, None, :, None] * inv_freq                 # [B, 1, S, D/2]
    return torch.cos(angles), torch.sin(angles)


def rope(x: torch.Tensor, tables) -> torch.Tensor:
    """Rotate-half RoPE. x [B, H, S, D], tables from `rope_tables` -> [B, H, S, D]."""
    cos, sin = tables
    d = x.shape[-1]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Projections of one attention (self or cross): q from the stream, k/v from a source."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, heads, self.head_dim).transpose(1, 2)           # [B, H, S, D]

    def query(self, x: torch.Tensor, tables) -> torch.Tensor:
        return rope(self._heads(self.wq(x), self.n_heads), tables)

    def key(self, src: torch.Tensor, tables) -> torch.Tensor:
        """Rotated keys [B, Hkv, S, D] of entries at the tables' positions."""
        return rope(self._heads(self.wk(src), self.n_kv_heads), tables)

    def value(self, src: torch.Tensor) -> torch.Tensor:
        return self._heads(self.wv(src), self.n_kv_heads)                   # [B, Hkv, S, D]

    def key_value(self, src: torch.Tensor, tables):
        """Rotated keys and values [B, Hkv, S, D] of entries at the tables' positions."""
        return self.key(src, tables), self.value(src)

    def attend(self, q, k_new, v_new, k_cache, v_cache, pos, window: int | None) -> torch.Tensor:
        out = attention(q, k_new, v_new, k_cache, v_cache, pos,
                                       window or 0, self.head_dim ** -0.5)  # [B, Hq, S, D]
        b, _, s, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))               # [B, S, d_model]


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class SelfLayer(nn.Module):
    """Self-attention and MLP of one layer (shared between stacks with shared_weights)."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff)


class CrossLayer(nn.Module):
    """Cross-attention of one layer of a consumer stack (always per stack); with
    `cfg.cross_gate` also a scalar gate [1] (the sublayer's output is scaled by tanh(gate))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads)
        if cfg.cross_gate:
            self.gate = nn.Parameter(torch.zeros(1))


class Trunk(nn.Module):
    """The self-attention + MLP layers of one stack."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(SelfLayer(cfg) for _ in range(cfg.layers_per_stack))


class CrossStack(nn.Module):
    """Everything a consumer stack k > 1 owns: its cross layers and the learned null slot."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.layers_per_stack))
        self.null = nn.Parameter(torch.zeros(cfg.d_model))
