"""`stagcompile serve` on a real uvicorn on localhost, over the demo bundle: completions and chat
(whole and streamed) give the tokens of running the request alone, bad input gets a 4xx JSON
error and the server keeps serving, a client that disconnects mid-stream frees its row, and
/v1/models, /health, /metrics answer."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from conftest import free_ports  # noqa: E402
from stagcompile.demo import DEMO_DIR  # noqa: E402
from stagcompile.runtime import Generator, Sampling  # noqa: E402

pytestmark = pytest.mark.xdist_group("demo")
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from stagcompile.export import export_bundle
    out = tmp_path_factory.mktemp("serve") / "demo"
    export_bundle(DEMO_DIR, out, "ort", "fp32", show_progress=False)
    return out


@pytest.fixture(scope="module")
def server(demo_bundle):
    from stagcompile.server import Engine, create_app
    engine = Engine(demo_bundle, max_batch=4, model_name="demo")
    port, = free_ports()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client, engine
    srv.should_exit = True
    thread.join()
    engine.close()


def alone(bundle, prompt: str, n: int, sampling=Sampling()) -> str:
    gen = Generator.load(bundle)
    ids = gen.encode([prompt])
    toks = gen.generate(ids, n, sampling, gen.eos_id)[0]
    text = gen.decode([t for t in toks if t != gen.eos_id])
    gen.close()
    return text


def sse(response) -> list[dict]:
    lines = [ln for ln in response.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_completions_whole_and_streamed_match_running_alone(server, demo_bundle):
    client, _ = server
    want = alone(demo_bundle, PROMPT, 12)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "demo"
    assert body["choices"][0]["text"] == want
    assert body["usage"]["completion_tokens"] == 12
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12,
                                                        "temperature": 0, "stream": True}) as r:
        chunks = sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    seeded = alone(demo_bundle, PROMPT, 10, Sampling(0.8, 40, 0.95, 7))
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "seed": 7,
                                             "temperature": 0.8, "top_k": 40, "top_p": 0.95})
    assert r.json()["choices"][0]["text"] == seeded


def test_chat_streams_a_role_then_content(server, demo_bundle):
    client, _ = server
    from stagcompile.openai_api import Message, chat_prompt
    messages = [{"role": "user", "content": "Speak, friend."}]
    want = alone(demo_bundle, chat_prompt([Message(**m) for m in messages]), 8)
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 8, "temperature": 0,
                             "stream": True}) as r:
        chunks = sse(r)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == want
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                  "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == want


def test_concurrent_streams_are_not_mixed(server, demo_bundle):
    client, _ = server
    prompts = ["Once upon a time", "The king", PROMPT, "O Romeo, Romeo", "Friends, Romans",
               "All the world"]
    want = {p: alone(demo_bundle, p, 9) for p in prompts}
    got = {}

    def one(p):
        with client.stream("POST", "/v1/completions", json={"prompt": p, "max_tokens": 9,
                                                            "temperature": 0,
                                                            "stream": True}) as r:
            got[p] = "".join(c["choices"][0]["text"] for c in sse(r))

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "invalid JSON"),
    ({"prompt": "hi", "bogus": 1}, 400, "bogus: Extra inputs are not permitted"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal"),
    ({"prompt": "hi", "max_tokens": 300}, 400, "max_tokens=300: a prompt of"),
    ({"prompt": "word " * 300}, 400, "exceed the capacity of this model"),
    ({"prompt": [1, 99999]}, 400, "token id 99999 is out of range"),
    ({"prompt": ""}, 400, "prompt: empty"),
    ({"prompt": "hi", "n": 2}, 400, "n: Input should be 1"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
])
def test_bad_input_gets_a_4xx_json_error_and_the_server_lives(server, body, status, message):
    client, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, str) else {"json": body}
    r = client.post("/v1/completions", **kw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert client.get("/health").json() == {"status": "ok"}


def test_disconnect_mid_stream_frees_the_row(server):
    client, engine = server
    before = engine.metrics.finished.labels("cancelled")._value.get()
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200,
                                                        "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.time() + 30
    while engine.batcher.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.batcher.active == 0
    assert engine.metrics.finished.labels("cancelled")._value.get() == before + 1


def test_stop_string_ends_the_text_and_counts_as_stop(server, demo_bundle):
    client, engine = server
    want = alone(demo_bundle, PROMPT, 24)
    stop = want[len(want) // 2: len(want) // 2 + 3]
    finished = engine.metrics.finished
    before = {r: finished.labels(r)._value.get() for r in ("stop", "cancelled")}
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24,
                                             "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == want[:want.index(stop)] and choice["finish_reason"] == "stop"
    deadline = time.time() + 30
    while engine.batcher.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.batcher.active == 0
    assert finished.labels("stop")._value.get() == before["stop"] + 1
    assert finished.labels("cancelled")._value.get() == before["cancelled"]


def test_models_health_metrics(server):
    client, _ = server
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["demo"]
    assert client.get("/health").status_code == 200
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ("stagcompile_queue_depth", "stagcompile_tokens_per_second",
                 "stagcompile_time_to_first_token_seconds_bucket",
                 "stagcompile_inter_token_latency_seconds_bucket",
                 "stagcompile_generated_tokens_total", "stagcompile_requests_total"):
        assert name in text
    ttft = [ln for ln in text.splitlines()
            if ln.startswith("stagcompile_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1
    assert np.isfinite(float(next(ln for ln in text.splitlines()
                                  if ln.startswith("stagcompile_tokens_per_second")).split()[-1]))
    assert client.get("/nothing").json()["error"]["message"] == "Not Found"


def test_serve_command_refuses_bad_options(tmp_path, demo_bundle):
    from typer.testing import CliRunner

    from cli import app
    runner = CliRunner()
    r = runner.invoke(app, ["serve", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "file not found" in r.output
    r = runner.invoke(app, ["serve", str(demo_bundle), "--max-batch", "99"])
    assert r.exit_code == 1 and "--max-batch 99: must be in 1..8" in r.output
    r = runner.invoke(app, ["serve", str(demo_bundle), "--port", "70000"])
    assert r.exit_code == 1 and "--port 70000: must be in 1..65535" in r.output
