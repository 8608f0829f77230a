"""The backend-agnostic scheduler: prefill, then decode steps under a schedule.

    staggered   every stack of a step at once. Backends with concurrency "threads" (ONNX Runtime)
                run stack k on persistent worker thread k (the caller's thread takes the last
                stack) and meet at a barrier made of two plain locks per worker: one futex wake
                to start, one to finish, no thread start per step. Backends with concurrency
                "streams" (TensorRT) enqueue every stack on its own CUDA stream and the
                cross-stack order is carried by CUDA events.
    sequential  the same graphs, one after another (comparison and debugging; same tokens).

A step is: write token and position in place -> run stacks (each commits its own entries) ->
read logits. The commit, the barrier and the sampling are the only serial parts. Prefill runs
the prompt in chunks (stack after stack per chunk).

An error a backend raises while running graphs (ONNX Runtime's, TensorRT's, any library's) comes
out as one `StackError` naming the stack, the step or prompt positions, the backend and the
library's message. In a prefill the stacks run inside the backend one after another; the stack
is the loop variable `k` of the backend's frame the error passed through (every backend loops
over stacks with `k`; without one the message names the prompt positions only).
"""

from __future__ import annotations

import threading

import numpy as np

from .bundle import BundleError

SCHEDULES = ("staggered", "sequential")
PREFILL_CHUNK = 256     # tokens per prefill run: bounds a prefill's activation memory


class CapacityError(Exception):
    """The cache of a model with unbounded attention is full."""


class StackError(BundleError):
    """A stack graph failed while running."""


def _failed(what: str, exc: BaseException) -> StackError:
    return StackError(f"{what}: {' '.join(str(exc).split()) or type(exc).__name__}")


def _stack_in(exc: BaseException, backend) -> int | None:
    """The 0-based stack `backend`'s loop was on when `exc` passed through it, if any."""
    k, tb = None, exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if local.get("self") is backend and isinstance(local.get("k"), int):
            k = local["k"]
        tb = tb.tb_next
    return k


class StackPool:
    """Worker threads 0 .. n-2 each run `fn(k, parity)`; the caller runs stack n-1."""

    def __init__(self, fn, n: int):
        self.fn, self.n = fn, n
        self.parity = 0
        self.errors: list[BaseException] = []
        self.alive = True
        self.go = [threading.Lock() for _ in range(n - 1)]
        self.done = [threading.Lock() for _ in range(n - 1)]
        for lock in self.go + self.done:
            lock.acquire()
        self.threads = [threading.Thread(target=self._work, args=(k,), daemon=True,
                                         name=f"stack{k + 1}") for k in range(n - 1)]
        for t in self.threads:
            t.start()

    def _work(self, k: int) -> None:
        go, done = self.go[k], self.done[k]
        while True:
            go.acquire()
            if not self.alive:
                done.release()
                return
            try:
                self.fn(k, self.parity)
            except BaseException as exc:     # re-raised on the caller's thread
                self.errors.append(exc)
            done.release()

    def run(self, parity: int) -> None:
        self.parity = parity
        for go in self.go:
            go.release()
        try:
            self.fn(self.n - 1, parity)
        finally:
            for done in self.done:
                done.acquire()
        if self.errors:
            err, self.errors = self.errors[0], []
            raise err

    def close(self) -> None:
        if self.alive:
            self.alive = False
            for go in self.go:
                go.release()
            for done in self.done:
                done.acquire()


class Scheduler:
    """Runs a backend's stacks over one generation session."""

    def __init__(self, backend, schedule: str = "staggered", max_seq_len: int = 0,
                 unbounded_length: bool = True, max_batch: int = 0,
                 prefill_chunk: int = PREFILL_CHUNK):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
        self.backend, self.schedule = backend, schedule
        self.max_seq_len, self.unbounded_length = max_seq_len, unbounded_length
        self.max_batch = max_batch
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.num_stacks = len(backend.ios)
        self.pool = None
        if schedule == "staggered" and backend.concurrency == "threads" and self.num_stacks > 1:
            self.pool = StackPool(self.launch, self.num_stacks)
        self.pos = 0
        self.at = 0

    def room(self, n: int = 1) -> bool:
        return self.unbounded_length or self.pos + n <= self.max_seq_len

    def start(self, batch: int) -> None:
        if self.max_batch and batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds max_batch={self.max_batch} of this bundle "
                             "(export with a larger --max-batch)")
        self.backend.open(batch)
        self.pos = 0

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Prompt [B, T] int64 -> logits of its last position [B, V]. Long prompts run in
        chunks of `prefill_chunk` tokens (stack after stack per chunk), which bounds the
        activation memory of a prefill whatever the prompt length."""
        if not self.room(ids.shape[1]):
            raise CapacityError(
                f"prompt of {ids.shape[1]} tokens does not fit the cache: this model has "
                f"unbounded attention and max_seq_len={self.max_seq_len}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = np.ascontiguousarray(ids[:, start:start + self.prefill_chunk])
            logits = self.run_prefill(chunk, self.pos)
            self.pos += chunk.shape[1]
        return logits

    def run_prefill(self, chunk: np.ndarray, pos: int, rows: slice | None = None) -> np.ndarray:
        """One prompt chunk [R, S] at `pos` (of the batch, or of `rows`) -> logits [R, V]."""
        try:
            if rows is None:
                return self.backend.prefill(chunk, pos)
            return self.backend.prefill(chunk, pos, rows)
        except (BundleError, CapacityError):
            raise
        except Exception as exc:
            k = _stack_in(exc, self.backend)
            where = "the stack graphs" if k is None else f"stack {k + 1} graph"
            raise _failed(f"{where} failed on the prompt ({self.backend.name} backend, prefill "
                          f"of positions {pos}..{pos + chunk.shape[1] - 1})", exc) from exc

    def launch(self, k: int, parity: int) -> None:
        """Stack k's decode step on the backend; its errors name the stack."""
        try:
            self.backend.launch(k, parity)
        except (BundleError, CapacityError):
            raise
        except Exception as exc:
            at = (f"at position {self.at}" if np.ndim(self.at) == 0 else
                  f"of {len(self.at)} rows at positions {min(self.at)}..{max(self.at)}")
            raise _failed(f"stack {k + 1} graph failed ({self.backend.name} backend, decode step "
                          f"{at})", exc) from exc

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens [B] at position self.pos -> logits [B, V]."""
        if not self.room():
            raise CapacityError(f"the cache is full at {self.pos} tokens (max_seq_len="
                                f"{self.max_seq_len}, unbounded attention)")
        logits = self.run_step(tokens, self.pos, self.pos % 2)
        self.pos += 1
        return logits

    def run_step(self, tokens: np.ndarray, pos, parity: int) -> np.ndarray:
        """One decode step of every stack under the schedule: tokens [n] of rows 0..n-1 at `pos`
        (one position, or one per row) -> logits [n, V]."""
        self.at = pos                       # for an error message only: formatted on failure
        self.backend.set_step(tokens, pos)
        if self.pool is not None:
            self.pool.run(parity)
        else:
            for k in range(self.num_stacks):
                self.launch(k, parity)
        return self.backend.finish()

    def seek(self, pos: int) -> None:
        """Continue decoding at `pos` <= the current position, as if later tokens had not been
        generated (their ring slots are rewritten). Exact for unbounded caches; with bounded
        windows the ring then mixes old and new entries, which is fine for timing runs only."""
        if not 0 < pos <= self.pos:
            raise ValueError(f"seek({pos}): expected 0 < pos <= {self.pos}")
        self.pos = pos

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.backend.close()
