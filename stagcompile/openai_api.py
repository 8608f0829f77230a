"""The OpenAI-compatible request and response bodies of `stagcompile serve` (pydantic models).

Requests are strict: an unknown field, a wrong type or a value out of range is a 400 with an
OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` (see `error_body`).
Supported fields: `prompt` (text, or token ids), `messages` (chat), `max_tokens`, `temperature`,
`top_p`, `top_k`, `seed`, `stop` (strings), `stop_token_ids`, `stream`, `n` (1 only), `model`,
`user`. The defaults follow OpenAI's (`max_tokens` 16, `temperature` 1).

Chat prompts use a plain template (`CHAT_TEMPLATE`): one "role: content" line per message, then
"assistant:"; StagFormer checkpoints carry no chat template of their own.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Sampled(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: list[int] = []
    stream: bool = False
    n: Literal[1] = 1
    user: Optional[str] = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stop if s]


class CompletionRequest(Sampled):
    prompt: Union[str, list[int]]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


def chat_prompt(messages: list[Message]) -> str:
    return CHAT_TEMPLATE.format(turns="".join(f"{m.role}: {m.content}\n" for m in messages))


CHAT_TEMPLATE = "{turns}assistant:"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(rid: str, model: str, text: str, reason: str | None, chat: bool,
               done: dict | None = None) -> dict:
    """A whole response (`done` = its usage) or one streamed chunk (`done` None)."""
    if chat:
        key = "message" if done is not None else "delta"
        choice = {"index": 0, key: {"role": "assistant", "content": text},
                  "finish_reason": reason, "logprobs": None}
        obj = "chat.completion" if done is not None else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice]}
    if done is not None:
        body["usage"] = done
    return body


def model_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "stagcompile"}]}
