"""In-flight (continuous) batching: requests join and leave one session of `max_batch` rows.

    batcher = Batcher(Generator.load("bundle"))            # the ort backend, either schedule
    req = batcher.submit(Request([12, 7, 3], max_new_tokens=32, stop_ids=(gen.eos_id,)))
    batcher.run_until_idle()          # or batcher.start(): a background thread serves submits
    req.tokens, req.finish_reason     # "stop" (a stop id, included), "length", "cancelled", "error"

One iteration (`step`):
1. cancelled requests leave (their rows are free at once);
2. waiting requests take free rows, lowest row first, and start at position 0;
3. one prefill chunk (at most `prefill_chunk` tokens) of the oldest request still prefilling
   runs on its row's views of the caches; a finished prompt samples its first token;
4. one decode step of the schedule (staggered or sequential) runs rows 0 .. n-1, n = 1 + the
   highest decoding row, every row at its own position; each decoding row samples its token with
   its own sampler and stops on its own stop ids, `max_new_tokens` or a full cache.

So prompts of any length are prefilled in chunks between decode steps, and a long prompt delays
the running requests by one chunk per step, not by the whole prompt.

Rows below n that are not decoding (free, or between prefill chunks) are computed too and their
outputs dropped: such a row sits at its next position (0 when free), so the step writes only that
row's cache slot of that position, which its next prefill chunk or decode step rewrites before
anything reads it, and its producers' cross entries, which the row does not read (a prefill keeps
them in `HostState.carry` and hands them over just before the row's first decode step). The
staggered pending buffers are indexed by the parity of a step counter shared by all rows. No graph
mixes rows, and every request has its own seeded sampler: the tokens are those of running each
request alone.

Callbacks (`on_token(request, token)`, `on_finish(request)`) run on the batcher's thread and must
be quick (the HTTP server hands them to its event loop); one that raises finishes its own request
with "error" and leaves the others alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .bundle import BundleError
from .sampling import Sampler, Sampling


@dataclass(eq=False)
class Request:
    ids: Sequence[int]
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    stop_ids: tuple[int, ...] = ()
    on_token: Callable | None = None
    on_finish: Callable | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""
    submitted: float = 0.0
    sampler: Sampler | None = None
    row: int = -1
    pos: int = 0
    cancelled: str = ""           # why the caller stopped it ("cancelled", or "stop": a stop string)
    done: threading.Event = field(default_factory=threading.Event)


class Batcher:
    def __init__(self, gen, max_batch: int | None = None, prefill_chunk: int | None = None):
        backend = gen.scheduler.backend
        if not getattr(backend, "inflight", False):
            raise BundleError(f"in-flight batching runs on the ort backend (CPU), not on "
                              f"{backend.name}")
        self.gen, self.scheduler = gen, gen.scheduler
        bundle_batch = gen.bundle.manifest["max_batch"]
        self.max_batch = max_batch or bundle_batch
        if not 1 <= self.max_batch <= bundle_batch:
            raise ValueError(f"--max-batch {self.max_batch}: must be in 1..{bundle_batch} (the "
                             "bundle's max_batch; export with a larger --max-batch)")
        self.prefill_chunk = prefill_chunk or self.scheduler.prefill_chunk
        self.vocab = gen.bundle.config["vocab_size"]
        self.max_seq_len = self.scheduler.max_seq_len
        self.limited = not self.scheduler.unbounded_length     # the cache ends at max_seq_len
        self.scheduler.start(self.max_batch)
        self.rows: list[Request | None] = [None] * self.max_batch
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.joining: list[Request] = []
        self.steps = 0
        self.tokens_total = 0
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.alive = False

    # ---- requests ------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """ValueError naming the field when `req` cannot be served."""
        ids = list(req.ids)
        if not ids:
            raise ValueError("prompt: empty (give at least one token)")
        bad = [i for i in ids if not 0 <= int(i) < self.vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is out of range [0, {self.vocab})")
        if self.limited and len(ids) > self.max_seq_len:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the capacity of this model "
                             f"(max_seq_len={self.max_seq_len}, unbounded attention)")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_tokens={req.max_new_tokens}: must be >= 1")

    def submit(self, req: Request) -> Request:
        self.check(req)
        req.ids = np.asarray(req.ids, np.int64)
        req.submitted = time.perf_counter()
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """Stop `req` at the next iteration and free its row: a client went away ("cancelled"),
        or the caller found a stop string in its text ("stop")."""
        with self.cond:
            req.cancelled = reason
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    # ---- one iteration -------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        with self.cond:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self.finish(req, req.cancelled)
            for req in [r for r in self.rows if r is not None and r.cancelled]:
                self.finish(req, req.cancelled)
            while self.waiting and None in self.rows:
                req = self.waiting.popleft()
                req.row, req.pos = self.rows.index(None), 0
                self.rows[req.row] = req
                self.prefilling.append(req)
        decoding = [r for r in self.rows if r is not None and r not in self.prefilling]
        if not self.prefilling and not decoding:
            return False
        if self.prefilling:
            req = self.prefilling[0]
            self.guarded(self.prefill, [req], req)
        decoding = [r for r in self.rows if r is not None and r not in self.prefilling]
        if decoding:
            self.guarded(self.decode, decoding, decoding)
        return True

    def guarded(self, run, requests: list[Request], *args) -> None:
        """A failed prefill or step fails the requests in it, not the batcher."""
        try:
            run(*args)
        except Exception as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            for req in requests:
                if req.finish_reason is None:
                    req.error = message
                    self.finish(req, "error")

    def prefill(self, req: Request) -> None:
        chunk = req.ids[req.pos:req.pos + self.prefill_chunk]
        logits = self.scheduler.run_prefill(chunk[None], req.pos, slice(req.row, req.row + 1))
        req.pos += len(chunk)
        if req.pos == len(req.ids):
            self.prefilling.popleft()
            self.joining.append(req)
            self.emit(req, logits)

    def decode(self, decoding: list[Request]) -> None:
        n = 1 + max(r.row for r in decoding)
        tokens, pos = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for r, req in enumerate(self.rows[:n]):
            if req is not None:
                pos[r] = req.pos
                tokens[r] = req.tokens[-1] if req.tokens else 0
        parity = self.steps % 2
        state = self.scheduler.backend.state
        for req in self.joining:
            state.handoff(slice(req.row, req.row + 1), parity)
        self.joining = []
        logits = self.scheduler.run_step(tokens, pos, parity)
        self.steps += 1
        for req in decoding:
            req.pos += 1
            self.emit(req, logits[req.row:req.row + 1])

    def emit(self, req: Request, logits: np.ndarray) -> None:
        """Sample `req`'s next token from its logits [1, V]; finish it when it should stop."""
        if req.sampler is None:
            req.sampler = Sampler(req.sampling)
        token = int(req.sampler(logits)[0])
        req.tokens.append(token)
        self.tokens_total += 1
        if not self.notify(req, req.on_token, token):
            self.finish(req, "error")
        elif token in req.stop_ids:
            self.finish(req, "stop")
        elif len(req.tokens) >= req.max_new_tokens or (self.limited
                                                       and req.pos >= self.max_seq_len):
            self.finish(req, "length")

    def finish(self, req: Request, reason: str) -> None:
        if req.row >= 0 and self.rows[req.row] is req:
            self.rows[req.row] = None
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req in self.joining:
            self.joining.remove(req)
        req.finish_reason = reason
        req.done.set()
        self.notify(req, req.on_finish)

    @staticmethod
    def notify(req: Request, callback, *args) -> bool:
        """Call one of `req`'s callbacks; a callback that fails fails its request only."""
        if callback is None:
            return True
        try:
            callback(req, *args)
            return True
        except Exception as exc:
            req.error = f"{getattr(callback, '__name__', 'callback')} failed: {exc}"
            return False

    # ---- driving -------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        while self.step():
            pass

    def start(self) -> None:
        """Serve submitted requests on a background thread until `close`."""
        self.alive = True
        self.thread = threading.Thread(target=self.loop, name="batcher", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while self.alive:
            if not self.step():
                with self.cond:
                    if self.alive and not self.waiting:
                        self.cond.wait(0.5)

    def close(self) -> None:
        if self.thread is not None:
            with self.cond:
                self.alive = False
                self.cond.notify()
            self.thread.join()
            self.thread = None
        for req in [r for r in self.rows if r is not None] + list(self.waiting):
            self.finish(req, "cancelled")
        self.waiting.clear()
