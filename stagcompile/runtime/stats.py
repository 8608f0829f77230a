"""Latency statistics of a generation, in memory that does not grow with its length.

Counts and sums are exact. Step times are kept in a reservoir of `KEEP` (4096) values: every
step while there are at most KEEP, so the median and p90 are exact for runs up to 4096 decode
steps; after that a uniform random sample of all steps (Vitter's algorithm R, seeded, so a run
is reproducible), whose median and p90 are within about half a percentile point of the exact
ones (the standard error of a quantile from 4096 samples).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

KEEP = 4096


class Reservoir:
    """A fixed-size uniform sample of a stream of floats."""

    def __init__(self, size: int = KEEP, seed: int = 0):
        self.values = np.zeros(size)
        self.count = 0
        self.rng = random.Random(seed)

    def add(self, value: float) -> None:
        if self.count < len(self.values):
            self.values[self.count] = value
        else:
            j = self.rng.randrange(self.count + 1)
            if j < len(self.values):
                self.values[j] = value
        self.count += 1

    def sample(self) -> np.ndarray:
        return self.values[:min(self.count, len(self.values))]


@dataclass
class Stats:
    prompt_tokens: int = 0
    batch: int = 0
    prefill_s: float = 0.0
    steps: int = 0
    decode_s: float = 0.0
    step_sample: Reservoir = field(default_factory=Reservoir)
    stopped: str = ""

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.decode_s += seconds
        self.step_sample.add(seconds)

    def summary(self) -> dict:
        ms = self.step_sample.sample() * 1e3 if self.steps else np.zeros(1)
        n = self.steps
        return {"prompt_tokens": self.prompt_tokens, "batch": self.batch,
                "new_tokens": n + 1 if self.prefill_s else 0,
                "prefill_ms": self.prefill_s * 1e3,
                "decode_ms_median": float(np.median(ms)),
                "decode_ms_p90": float(np.percentile(ms, 90)),
                "decode_tokens_per_s": self.batch * n / self.decode_s if n else 0.0,
                "total_s": self.prefill_s + self.decode_s, "stopped": self.stopped}
