"""The OpenAI-compatible wire format: request bodies (pydantic, validated), responses, stream
chunks and errors, shaped as OpenAI's API (and vLLM's multi-LoRA serving) so clients work unchanged.

Unknown fields are ignored, as OpenAI-compatible servers do (clients add fields release by
release); known fields this server does not implement are refused with 400 when set to anything
but their neutral value, so nothing a client asked for is silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Unsupported(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="A served adapter's name, or the base model's id")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def check_supported(self) -> None:
        for param, ok in (("n", self.n == 1), ("presence_penalty", self.presence_penalty == 0),
                          ("frequency_penalty", self.frequency_penalty == 0), ("logit_bias", not self.logit_bias)):
            if not ok:
                raise Unsupported(param, f"{param}: not supported by this server (leave it at its default)")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def seed_value(self) -> int | None:
        return None if self.seed is None else self.seed % 2**63


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] = Field(description="One prompt: text, or token ids")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests for several prompts)")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    def check_supported(self) -> None:
        super().check_supported()
        for param, ok in (("echo", not self.echo), ("logprobs", self.logprobs is None),
                          ("best_of", self.best_of in (None, 1)), ("suffix", self.suffix is None)):
            if not ok:
                raise Unsupported(param, f"{param}: not supported by this server")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _limit(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def check_supported(self) -> None:
        super().check_supported()
        for param, ok in (("logprobs", not self.logprobs), ("top_logprobs", self.top_logprobs is None),
                          ("tools", not self.tools),
                          ("response_format", self.response_format in (None, {"type": "text"}))):
            if not ok:
                raise Unsupported(param, f"{param}: not supported by this server")


# ----- responses ------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The first error as 'field: reason', and the field path as OpenAI's `param`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, str) or not p.startswith(("list[", "str", "int")))
    msg = err["msg"].removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseIds:
    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.fingerprint: str | None = None  # set once the engine admitted the request
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        # system_fingerprint names the weights that answered: the adapter, and its step while it trains
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def full(self, text: str, finish_reason: str, prompt: int, completion: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(prompt, completion)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(prompt, completion)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt, completion)}
