"""The Triton Inference Server model of a stagcompile bundle (Python backend, decoupled streaming).

`stagcompile triton BUNDLE -o REPO` copies this file to REPO/<model>/1/model.py, next to a copy of
the runtime (`runtime/`) and of the bundle (`bundle/`); it runs inside Triton's Python backend
stub, so it needs numpy, onnxruntime (and tokenizers) in the stub's Python, never stagcompile.

Inputs (one request = one prompt; `max_batch_size: 0`):
    input_ids    INT64 [T]        the prompt's token ids
    max_tokens   INT32 [1]        optional, default 16
    temperature  FP32 [1]         optional, default 0 (greedy)
    top_k INT32 [1], top_p FP32 [1], seed INT64 [1]          optional sampling
    stop_ids     INT64 [N]        optional stop token ids (the tokenizer's <|endoftext|> always)
Outputs, one response per generated token, then a final one (decoupled):
    token         INT64 [n]       n = 1 in token responses, 0 in the final response
    finish_reason BYTES [1]       "" in token responses; stop, length, cancelled or error last

Every request joins the model's in-flight `Batcher` (one background thread; ONNX Runtime releases
the GIL): responses are sent from that thread. A request the client cancels is cancelled in the
batcher at its next token, which frees its row. Bad inputs get a final response with an error.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from runtime import Generator, Sampling  # noqa: E402
from runtime.inflight import Batcher, Request  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _response(tokens: list, reason: str):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("token", np.array(tokens, np.int64)),
        pb_utils.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_))])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        max_batch = int(_param(config, "max_batch", "0")) or None
        schedule = _param(config, "schedule", "staggered")
        self.gen = Generator.load(HERE / "bundle", schedule=schedule)
        self.batcher = Batcher(self.gen, max_batch)
        self.batcher.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = self.request(request)
                self.batcher.check(req)
            except (ValueError, TypeError) as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=FINAL)
                continue
            req.on_token = self.on_token(request, sender)
            req.on_finish = lambda r, sender=sender: sender.send(
                _response([], r.finish_reason if r.finish_reason != "error"
                          else f"error: {r.error}"), flags=FINAL)
            self.batcher.submit(req)
        return None

    def on_token(self, request, sender):
        def send(req, token):
            if request.is_cancelled():
                self.batcher.cancel(req)
                return
            sender.send(_response([token], ""))
        return send

    def request(self, request) -> Request:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
        stop = pb_utils.get_input_tensor_by_name(request, "stop_ids")
        stops = [] if stop is None else [int(t) for t in stop.as_numpy().reshape(-1)]
        if self.gen.eos_id is not None:
            stops.append(self.gen.eos_id)
        sampling = Sampling(float(_scalar(request, "temperature", 0.0)),
                            int(_scalar(request, "top_k", 0)), float(_scalar(request, "top_p", 1.0)),
                            _scalar(request, "seed", None))
        return Request([int(t) for t in ids], int(_scalar(request, "max_tokens", 16)), sampling,
                       tuple(stops))

    def finalize(self):
        self.batcher.close()
        self.gen.close()
