"""Bounded localhost load test of `stagcompile serve`: 1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve_load.py [BUNDLE] [--clients 1 8 32] [--requests 8] [--max-tokens 64]
                                    [--max-batch 32] [--duration 300] [--no-http]

Without BUNDLE it exports the shipped demo checkpoint (ort flavour, max batch 32) to a temporary
folder. It starts `stagcompile serve` as a child process on a free localhost port, asks for each
prompt's greedy completion once (the reference: text and completion tokens), then for each client
count c runs c clients that each send `--requests` streaming /v1/completions requests one after
another (prompts in turn from a fixed list). It stops by itself: a fixed number of requests, and
every level has a deadline (`--duration` seconds).

Checks (exit 1 if any fails): every request ends with a finish_reason and `data: [DONE]`, and its
streamed text equals its prompt's reference text (greedy decoding: nothing lost, nothing mixed
between requests). Reports per level: total completion tokens/s over the level's wall time, its
ratio to one client's, request latency p50/p99 and time to first token p50/p99.

`--no-http` runs the same pattern on the in-flight `Batcher` in this process (no server, no HTTP:
each client's next request is submitted when its previous one finishes) and reports tokens/s:
how far the engine itself scales with the batch on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time", "To be, or not to be, that is the question:", "The king",
           "O Romeo, Romeo, wherefore art thou", "Friends, Romans, countrymen", "All the world's",
           "Now is the winter of our discontent", "If music be the food of love"]


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--duration", type=float, default=300.0, help="deadline per level, seconds")
    ap.add_argument("--no-http", action="store_true", help="drive the Batcher directly")
    a = ap.parse_args()
    print(f"$ python benchmarks/serve_load.py " + shlex.join(sys.argv[1:]), flush=True)
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, parts, reason, done = None, [], None, False
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"prompt": prompt, "error": f"HTTP {r.status_code}: {await r.aread()}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            first = first or time.perf_counter()
            choice = json.loads(line[6:])["choices"][0]
            parts.append(choice["text"])
            reason = choice["finish_reason"] or reason
    end = time.perf_counter()
    return {"prompt": prompt, "text": "".join(parts), "reason": reason, "done": done,
            "latency": end - t0, "ttft": (first or end) - t0}


async def level(base: str, clients: int, requests: int, max_tokens: int, deadline: float):
    async def client_loop(c: int, client: httpx.AsyncClient) -> list[dict]:
        return [await one(client, PROMPTS[(c + i) % len(PROMPTS)], max_tokens)
                for i in range(requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=deadline, limits=limits) as client:
        t0 = time.perf_counter()
        runs = await asyncio.wait_for(asyncio.gather(*(client_loop(c, client)
                                                       for c in range(clients))), deadline)
        return [r for run in runs for r in run], time.perf_counter() - t0


def reference(base: str, max_tokens: int) -> dict:
    out = {}
    with httpx.Client(base_url=base, timeout=120) as client:
        for p in PROMPTS:
            body = client.post("/v1/completions", json={"prompt": p, "max_tokens": max_tokens,
                                                        "temperature": 0}).json()
            out[p] = (body["choices"][0]["text"], body["usage"]["completion_tokens"])
    return out


def start_server(bundle: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(bundle),
                             "--port", str(port), "--max-batch", str(max_batch)])
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"stagcompile serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("stagcompile serve did not become healthy in 120 s")


def main() -> int:
    a = args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = a.bundle
        if bundle is None:
            sys.path.insert(0, str(ROOT))
            from stagcompile.demo import DEMO_DIR
            from stagcompile.export import export_bundle
            bundle = Path(tmp) / "demo"
            export_bundle(DEMO_DIR, bundle, "ort", "fp32", max_batch=a.max_batch,
                          show_progress=False)
        if a.no_http:
            return engine_only(a, bundle)
        proc, base = start_server(bundle, a.max_batch)
        try:
            return report(a, base)
        finally:
            proc.terminate()
            proc.wait(30)


def engine_only(a, bundle: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from stagcompile.runtime import Generator
    from stagcompile.runtime.inflight import Batcher, Request
    gen = Generator.load(bundle)
    batcher = Batcher(gen, a.max_batch)
    ids = [gen.encode([p])[0] for p in PROMPTS]
    print(f"\nBatcher only, {a.requests} requests per client, {a.max_tokens} max tokens, greedy\n")
    print("| clients | requests | tokens | wall s | tokens/s | x one client |")
    print("|---|---|---|---|---|---|")
    single = None
    for clients in a.clients:
        done: list = []

        def submit(c: int, i: int) -> None:
            def chain(req):
                done.append(req)
                if i + 1 < a.requests:
                    submit(c, i + 1)
            batcher.submit(Request(ids[(c + i) % len(ids)], a.max_tokens, on_finish=chain))

        t0 = time.perf_counter()
        for c in range(clients):
            submit(c, 0)
        batcher.run_until_idle()
        wall = time.perf_counter() - t0
        tokens = sum(len(r.tokens) for r in done)
        single = single or tokens / wall
        print(f"| {clients} | {len(done)} | {tokens} | {wall:.2f} | {tokens / wall:.1f} | "
              f"{tokens / wall / single:.2f} |", flush=True)
    gen.close()
    return 0


def report(a, base: str) -> int:
    ref = reference(base, a.max_tokens)
    print(f"\n{a.requests} streaming requests per client, {a.max_tokens} max tokens, greedy, "
          f"max batch {a.max_batch}\n")
    print("| clients | requests | tokens | wall s | tokens/s | x one client | latency p50 s | "
          "latency p99 s | TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures, single = [], None
    for clients in a.clients:
        results, wall = asyncio.run(level(base, clients, a.requests, a.max_tokens, a.duration))
        bad = [r for r in results if r.get("error") or not r["done"] or not r["reason"]
               or r["text"] != ref[r["prompt"]][0]]
        failures += bad
        tokens = sum(ref[r["prompt"]][1] for r in results)
        rate = tokens / wall
        single = single or rate
        lat = np.array([r.get("latency", np.nan) for r in results])
        ttft = np.array([r.get("ttft", np.nan) for r in results])
        print(f"| {clients} | {len(results)} | {tokens} | {wall:.2f} | {rate:.1f} | "
              f"{rate / single:.2f} | {np.percentile(lat, 50):.3f} | {np.percentile(lat, 99):.3f} "
              f"| {np.percentile(ttft, 50):.3f} | {np.percentile(ttft, 99):.3f} |", flush=True)
    if failures:
        print(f"\n{len(failures)} requests lost or mixed, first: {failures[0]}")
        return 1
    print("\nevery request complete and equal to its prompt's single-client text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
