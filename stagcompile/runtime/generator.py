"""The Python API of the runtime: load a bundle, prefill, step, generate with streaming.

    gen = Generator.load("bundle", backend="ort", schedule="staggered")
    for tokens in gen.stream(gen.encode(["Once upon a time"]), max_new_tokens=32):
        ...                                       # tokens [B] as they are produced
    gen.stats                                     # prefill time, per-step latencies (bounded)

Only numpy, tokenizers (when the bundle has tokenizer.json) and the backend's library are needed.
"""

from __future__ import annotations

import time

import numpy as np

from .bundle import Bundle, BundleError
from .sampling import Sampler, Sampling
from .scheduler import CapacityError, Scheduler
from .stats import Stats

BACKENDS = ("ort", "trt", "ort-cuda")


def make_backend(bundle: Bundle, backend: str, schedule: str, threads=None, spinning=False,
                 flavour: str | None = None, huge_pages: bool = True):
    if backend == "ort":
        from .ort_backend import OrtBackend
        default = 1 if schedule == "staggered" else _cores()
        return OrtBackend(bundle, threads if threads is not None else default, spinning, flavour,
                          huge_pages)
    if backend == "ort-cuda":
        from .ort_cuda import OrtCudaBackend
        return OrtCudaBackend(bundle, threads if threads is not None else 1)
    if backend == "trt":
        from .trt_backend import TrtBackend
        return TrtBackend(bundle, sequential=schedule == "sequential")
    raise BundleError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_tokenizer(path, vocab_size: int):
    """A tokenizer.json for a model of `vocab_size`; BundleError if it does not load or its ids
    reach past the embedding (export checks the checkpoint's with this too)."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:      # tokenizers raises a bare Exception on bad files
        raise BundleError(f"{path}: not a tokenizers JSON file ({exc})") from None
    if tok.get_vocab_size() > vocab_size:
        raise BundleError(f"{path}: the tokenizer has {tok.get_vocab_size()} tokens, more than "
                          f"the model's vocab_size={vocab_size}")
    return tok


def _check_prompt(ids: np.ndarray) -> None:
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"prompt ids must have shape [batch, tokens] with batch, tokens >= 1, "
                         f"got {list(ids.shape)}")


class Generator:
    def __init__(self, bundle: Bundle, backend, schedule: str):
        self.bundle = bundle
        self.backend_name = backend.name
        self.schedule = schedule
        caches = bundle.manifest["caches"]
        self.scheduler = Scheduler(backend, schedule, bundle.config["max_seq_len"],
                                   caches["unbounded_length"], bundle.manifest["max_batch"])
        self.tokenizer = (None if bundle.tokenizer is None
                          else load_tokenizer(bundle.tokenizer, bundle.config["vocab_size"]))
        self.stats = Stats()

    @classmethod
    def load(cls, root, backend: str = "ort", schedule: str = "staggered", threads=None,
             spinning: bool = False, verify: bool = True, flavour: str | None = None,
             huge_pages: bool = True) -> "Generator":
        """`flavour` picks the graphs of the ort backend (default: `ort` when the bundle has
        them, else `portable`); `huge_pages` backs its weights with huge pages."""
        bundle = Bundle.load(root, verify=verify)
        return cls(bundle, make_backend(bundle, backend, schedule, threads, spinning, flavour,
                                        huge_pages), schedule)

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise BundleError(f"{self.bundle.root}: the bundle has no tokenizer.json; pass "
                              "token ids instead of text")
        ids = [self.tokenizer.encode(p).ids for p in prompts]
        if len({len(i) for i in ids}) != 1:
            raise ValueError("prompts of a batch must have the same number of tokens, got "
                             f"{[len(i) for i in ids]}")
        if not ids[0]:
            raise ValueError("the prompt is empty after tokenization")
        return np.array(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])

    @property
    def eos_id(self) -> int | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.token_to_id("<|endoftext|>")

    # ---- generation ----------------------------------------------------------------------------
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        _check_prompt(ids)
        self.scheduler.start(ids.shape[0])
        return self.scheduler.prefill(ids)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.scheduler.step(tokens)

    def stream(self, ids: np.ndarray, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
               eos_id: int | None = None):
        """Yield the next tokens [B] one step at a time (rows that hit EOS repeat EOS)."""
        ids = np.asarray(ids, dtype=np.int64)
        _check_prompt(ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        sampler = Sampler(sampling)
        self.stats = st = Stats(prompt_tokens=ids.shape[1], batch=ids.shape[0])
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        st.prefill_s = time.perf_counter() - t0
        done = np.zeros(ids.shape[0], bool)
        for i in range(max_new_tokens):
            tokens = sampler(logits)
            if eos_id is not None:
                tokens = np.where(done, eos_id, tokens)
                done |= tokens == eos_id
            yield tokens
            if i + 1 == max_new_tokens:
                st.stopped = "max_new_tokens"
                break
            if eos_id is not None and done.all():
                st.stopped = "eos"
                break
            if not self.scheduler.room():
                st.stopped = (f"cache full at {self.scheduler.pos} tokens (max_seq_len "
                              f"{self.scheduler.max_seq_len}, unbounded attention)")
                break
            t1 = time.perf_counter()
            logits = self.step(tokens)
            st.add_step(time.perf_counter() - t1)

    def generate(self, ids: np.ndarray, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
                 eos_id: int | None = None) -> np.ndarray:
        """All new tokens [B, n]."""
        return np.stack(list(self.stream(ids, max_new_tokens, sampling, eos_id)), axis=1)

    def close(self) -> None:
        self.scheduler.close()


__all__ = ["Generator", "Sampling", "CapacityError", "BundleError"]
