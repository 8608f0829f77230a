"""`stagcompile triton`: the model repository loads in the real `tritonserver` (the one the
nvidia-pytriton wheel ships, on CPU), streams one response per token over gRPC to `tritonclient`
for concurrent requests (the tokens of running each alone, nothing mixed), and answers bad
input with an error response; the repository writer refuses bad options without writing."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_ports
from stagcompile.demo import DEMO_DIR
from stagcompile.errors import StagError
from stagcompile.runtime import Generator
from stagcompile.triton_repo import write_repository

pytestmark = pytest.mark.xdist_group("demo")
PROMPTS = ["Once upon a time", "To be, or not to be", "The king", "O Romeo, Romeo",
           "Friends, Romans", "All the world"]


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from stagcompile.export import export_bundle
    out = tmp_path_factory.mktemp("triton") / "demo"
    export_bundle(DEMO_DIR, out, "ort", "fp32", show_progress=False)
    return out


def server_dir(tmp: Path) -> tuple[Path, dict]:
    """pytriton's tritonserver with the Python backend stub of this Python, and its env."""
    pytriton = pytest.importorskip("pytriton", reason="nvidia-pytriton (the triton extra) is "
                                   "not installed: it ships tritonserver")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    if not (dist / "bin" / "tritonserver").is_file() or not stub.is_file():
        pytest.skip(f"{dist}: no tritonserver binary or no Python backend stub for this Python")
    out = tmp / "tritonserver"
    shutil.copytree(dist, out, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(stub, out / "backends" / "python" / "triton_python_backend_stub")
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               LD_LIBRARY_PATH=":".join(p for p in (os.environ.get("LD_LIBRARY_PATH"), str(libs))
                                        if p))
    return out, env


@pytest.fixture(scope="module")
def triton(demo_bundle, tmp_path_factory):
    grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient (the triton extra) is "
                               "not installed")
    tmp = tmp_path_factory.mktemp("tritonserver")
    repo = write_repository(demo_bundle, tmp / "repo", max_batch=4)
    dist, env = server_dir(tmp)
    http, grpc_port, metrics = free_ports(3)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([str(dist / "bin" / "tritonserver"), "--model-repository", str(repo),
                             "--backend-directory", str(dist / "backends"),
                             "--http-port", str(http), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(metrics), "--allow-metrics", "false",
                             "--exit-timeout-secs", "10"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if client.is_model_ready("stagformer"):
                break
        except Exception:                          # not listening yet
            pass
        time.sleep(0.5)
    text = (tmp / "server.log").read_text()
    if proc.poll() is not None and "stagformer" not in text:
        pytest.skip(f"tritonserver cannot start here (exit {proc.returncode}): "
                    f"{text.strip().splitlines()[-1] if text.strip() else 'no output'}")
    assert proc.poll() is None and client.is_model_ready("stagformer"), text[-3000:]
    yield grpc, client
    client.close()
    proc.terminate()
    proc.wait(60)
    log.close()


def stream(grpc, client, prompts: list[list[int]], max_tokens: int, extra=None) -> dict:
    """Send every prompt on one decoupled gRPC stream; tokens and finish reason by request."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i, ids in enumerate(prompts):
        inputs = [grpc.InferInput("input_ids", [len(ids)], "INT64"),
                  grpc.InferInput("max_tokens", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.array(ids, np.int64))
        inputs[1].set_data_from_numpy(np.array([max_tokens], np.int32))
        client.async_stream_infer("stagformer", inputs, request_id=str(i),
                                  outputs=[grpc.InferRequestedOutput("token"),
                                           grpc.InferRequestedOutput("finish_reason")])
    got = {str(i): ([], None) for i in range(len(prompts))}
    pending = set(got)
    while pending:
        result, error = results.get(timeout=120)
        if error is not None:
            return {"error": str(error)}
        rid = result.get_response().id
        tokens, _ = got[rid]
        tokens.extend(int(t) for t in result.as_numpy("token"))
        reason = result.as_numpy("finish_reason")[0].decode()
        if reason:
            got[rid] = (tokens, reason)
            pending.discard(rid)
    client.stop_stream()
    return got


def test_triton_streams_tokens_of_concurrent_requests(triton, demo_bundle):
    grpc, client = triton
    gen = Generator.load(demo_bundle)
    prompts = [gen.encode([p])[0].tolist() for p in PROMPTS]
    want = {str(i): [int(t) for t in gen.generate(np.array([ids]), 10, eos_id=gen.eos_id)[0]]
            for i, ids in enumerate(prompts)}
    gen.close()
    got = stream(grpc, client, prompts, 10)
    assert {rid: tokens for rid, (tokens, _) in got.items()} == want
    assert all(reason in ("length", "stop") for _, reason in got.values())


def test_triton_bad_input_gets_an_error_response(triton):
    grpc, client = triton
    got = stream(grpc, client, [[1, 999999]], 4)
    assert "token id 999999 is out of range" in got["error"]
    assert client.is_model_ready("stagformer")


def test_repository_writer_refuses_bad_options(demo_bundle, tmp_path):
    with pytest.raises(StagError, match="--max-batch 99: must be in 1..8"):
        write_repository(demo_bundle, tmp_path / "r", max_batch=99)
    with pytest.raises(StagError, match="--model-name 'a b'"):
        write_repository(demo_bundle, tmp_path / "r", model_name="a b")
    assert not (tmp_path / "r").exists()
    write_repository(demo_bundle, tmp_path / "r")
    with pytest.raises(StagError, match="already exists"):
        write_repository(demo_bundle, tmp_path / "r")
    files = {p.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r").rglob("*")}
    assert {"stagformer/config.pbtxt", "stagformer/1/model.py", "stagformer/1/runtime/inflight.py",
            "stagformer/1/bundle/manifest.json"} <= files
    assert 'decoupled: true' in (tmp_path / "r" / "stagformer" / "config.pbtxt").read_text()
