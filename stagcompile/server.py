"""`stagcompile serve`: an OpenAI-compatible HTTP server over one bundle (FastAPI + uvicorn).

    stagcompile serve BUNDLE --port 8000 --max-batch 8
    curl localhost:8000/v1/completions -d '{"prompt": "Once upon", "max_tokens": 32, "stream": true}'

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream as server-sent events
with `"stream": true`, ending with `data: [DONE]`), `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text: queue depth, active rows, generated tokens and tokens/s over
the last 10 s, time to first token, inter-token latency, finished requests by reason).

Every request becomes one `runtime.inflight.Request` of a `Batcher` that runs on its own thread
(ONNX Runtime releases the GIL); its tokens reach the request's asyncio queue through
`call_soon_threadsafe`. A client that disconnects (mid-stream or while waiting) has its request
cancelled, which frees its row at the batcher's next iteration. Bad input gets a 400 (404 for an
unknown model) with an OpenAI-style error body; a failing step fails only the requests in it
(500 with the message); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from stagcompile import openai_api as api
from stagcompile.runtime import Generator, Sampling
from stagcompile.runtime.inflight import Batcher, Request

WINDOW_S = 10.0          # tokens/s gauge window
POLL_S = 0.5             # how often a waiting non-streaming request checks its client


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, batcher: Batcher):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = reg = CollectorRegistry()
        Gauge("stagcompile_queue_depth", "Requests waiting for a free row",
              registry=reg).set_function(lambda: batcher.queue_depth)
        Gauge("stagcompile_active_requests", "Rows in use (prefilling or decoding)",
              registry=reg).set_function(lambda: batcher.active)
        Gauge("stagcompile_tokens_per_second", f"Generated tokens per second over the last "
              f"{WINDOW_S:g} s", registry=reg).set_function(self.rate)
        self.tokens = Counter("stagcompile_generated_tokens", "Generated tokens", registry=reg)
        self.ttft = Histogram("stagcompile_time_to_first_token_seconds", "Submit to first token",
                              registry=reg, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                                     5, 10, 30))
        self.itl = Histogram("stagcompile_inter_token_latency_seconds", "Between two tokens of "
                             "a request", registry=reg, buckets=(.001, .0025, .005, .01, .025,
                                                                 .05, .1, .25, .5, 1))
        self.finished = Counter("stagcompile_requests", "Finished requests", ["finish_reason"],
                                registry=reg)
        self.recent: deque[float] = deque()
        self.lock = threading.Lock()

    def token(self, req: Request, last: float | None) -> float:
        now = time.perf_counter()
        self.tokens.inc()
        if last is None:
            self.ttft.observe(now - req.submitted)
        else:
            self.itl.observe(now - last)
        with self.lock:
            self.recent.append(now)
            while self.recent[0] < now - WINDOW_S:
                self.recent.popleft()
        return now

    def rate(self) -> float:
        with self.lock:
            cut = time.perf_counter() - WINDOW_S
            return sum(t >= cut for t in self.recent) / WINDOW_S

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class Engine:
    """A bundle's Generator, its Batcher thread and the server's metrics."""

    def __init__(self, bundle: Path, max_batch: int | None = None, schedule: str = "staggered",
                 flavour: str | None = None, model_name: str | None = None):
        self.gen = Generator.load(bundle, schedule=schedule, flavour=flavour)
        self.batcher = Batcher(self.gen, max_batch)
        self.metrics = Metrics(self.batcher)
        self.model = model_name or Path(bundle).resolve().name
        self.created = int(time.time())
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        self.gen.close()

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.gen.tokenizer is None:
            raise ValueError("prompt: this bundle has no tokenizer.json; give token ids")
        return self.gen.tokenizer.encode(prompt).ids

    def request(self, body: api.Sampled, ids: list[int]) -> Request:
        """A batcher request for `body`; ValueError naming the field when it cannot be served."""
        stops = tuple(body.stop_token_ids) + (() if self.gen.eos_id is None
                                              else (self.gen.eos_id,))
        sampling = Sampling(body.temperature, body.top_k, body.top_p, body.seed)
        req = Request(ids, body.max_tokens, sampling, stops)
        self.batcher.check(req)
        cap = self.gen.scheduler.max_seq_len - len(ids) + 1
        if not self.gen.scheduler.unbounded_length and body.max_tokens > cap:
            raise ValueError(f"max_tokens={body.max_tokens}: a prompt of {len(ids)} tokens leaves "
                             f"room for at most {cap} (max_seq_len="
                             f"{self.gen.scheduler.max_seq_len})")
        return req

    async def run(self, req: Request, http: HttpRequest, stops: list[str]):
        """Submit `req`; yield (text delta, finish reason or None) until it finishes. Cancels it
        when the client goes away or the consumer stops early."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        last = [None]

        def on_token(r, token):
            last[0] = self.metrics.token(r, last[0])
            loop.call_soon_threadsafe(queue.put_nowait, token)

        def on_finish(r):
            loop.call_soon_threadsafe(queue.put_nowait, None)

        req.on_token, req.on_finish = on_token, on_finish
        self.batcher.submit(req)
        text = Detokenizer(self.gen, req.stop_ids, stops)
        reason = "cancelled"              # what the client was told; counted once, at the end
        try:
            while True:
                try:
                    token = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                tokens = [token]
                while tokens[-1] is not None and not queue.empty():   # coalesce a backlog
                    tokens.append(queue.get_nowait())
                delta = "".join(text.add(t) for t in tokens if t is not None)
                if text.stopped:
                    reason = "stop"
                    yield delta, reason
                    return
                if tokens[-1] is None:
                    reason = req.finish_reason
                    yield delta + text.flush(), reason
                    return
                if delta:
                    yield delta, None
        finally:
            self.metrics.finished.labels(reason).inc()
            if req.finish_reason is None:
                self.batcher.cancel(req, reason)


class Detokenizer:
    """Text of a growing token list: deltas never split a UTF-8 character, stop tokens are not
    text, and a stop string ends the text before it (text that could begin one is held back)."""

    def __init__(self, gen: Generator, stop_ids, stops: list[str]):
        self.gen, self.stop_ids, self.stops = gen, set(stop_ids), stops
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        if token not in self.stop_ids:
            self.ids.append(token)
        text = self.gen.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self.take(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self.take(text[:max(self.sent, len(text) - self.hold)])

    def flush(self) -> str:
        return self.take(self.gen.decode(self.ids))

    def take(self, text: str) -> str:
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(api.error_body(message, **kw), status_code=status)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="stagcompile", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        if err["type"] == "json_invalid":
            return _error(400, f"request body: invalid JSON ({err['msg']})")
        return _error(400, f"{loc or 'request body'}: {err['msg']}", param=loc or None)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(_, exc: Exception):
        return _error(500, f"internal error: {exc}", kind="server_error")

    @app.get("/health")
    async def health():
        alive = engine.batcher.thread is not None and engine.batcher.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped"}, 200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return api.model_list(engine.model, engine.created)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, http: HttpRequest):
        return await respond(body, http, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, http: HttpRequest):
        return await respond(body, http, api.chat_prompt(body.messages), chat=True)

    async def respond(body: api.Sampled, http: HttpRequest, prompt, chat: bool):
        if body.model not in (None, engine.model):
            return _error(404, f"model {body.model!r} does not exist (this server serves "
                          f"{engine.model!r})", param="model", code="model_not_found")
        try:
            ids = engine.prompt_ids(prompt)
            req = engine.request(body, ids)
        except ValueError as exc:
            field = str(exc).split(":")[0].split("=")[0]
            return _error(400, str(exc), param=field)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        stream = engine.run(req, http, body.stop_strings())
        if body.stream:
            return StreamingResponse(events(rid, stream, chat), media_type="text/event-stream")
        parts, reason = [], None
        async for delta, reason in stream:
            parts.append(delta)
        if reason == "error":
            return _error(500, f"generation failed: {req.error}", kind="server_error")
        if reason is None:                       # the client went away
            return _error(499, "client closed the request")
        done = api.usage(len(ids), len(req.tokens))
        return api.completion(rid, engine.model, "".join(parts), reason, chat, done)

    async def events(rid: str, stream, chat: bool):
        if chat:
            yield sse(api.completion(rid, engine.model, "", None, chat))
        async for delta, reason in stream:
            if reason == "error":
                yield sse(api.error_body("generation failed", "server_error"))
                break
            yield sse(api.completion(rid, engine.model, delta, reason, chat))
        yield "data: [DONE]\n\n"

    return app


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int | None = None,
          schedule: str = "staggered", flavour: str | None = None,
          model_name: str | None = None) -> None:
    import uvicorn
    engine = Engine(bundle, max_batch, schedule, flavour, model_name)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
    finally:
        engine.close()
