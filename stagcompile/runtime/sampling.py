"""Token selection from logits [B, V] in numpy: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} (--temperature): must be a finite "
                             "number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} (--top-k): must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} (--top-p): must be in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed={self.seed} (--seed): must be >= 0")


class Sampler:
    def __init__(self, cfg: Sampling):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row, int64 [B]."""
        cfg = self.cfg
        if cfg.temperature == 0.0:
            return logits.argmax(-1).astype(np.int64)
        z = logits.astype(np.float64) / cfg.temperature
        if cfg.top_k and cfg.top_k < z.shape[-1]:
            kth = np.partition(z, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max(-1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(-1, keepdims=True)
        if cfg.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, -1)
            drop = np.cumsum(sorted_p, -1) - sorted_p >= cfg.top_p   # keeps at least one
            sorted_p[drop] = 0.0
            probs = np.zeros_like(probs)
            np.put_along_axis(probs, order, sorted_p, -1)
            probs /= probs.sum(-1, keepdims=True)
        u = self.rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, -1) < u).sum(-1), probs.shape[-1] - 1).astype(np.int64)
