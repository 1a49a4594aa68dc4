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


MAX_N = 128  # choices per request (each takes a KV cache row)
MAX_LOGPROBS = 20  # OpenAI's limit on top alternatives


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
    top_k: int = Field(0, ge=-1, description="vLLM's: the k most likely tokens only (0 or -1: off)")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
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

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids (got {key!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100 (got {bias})")
        return v

    def check_supported(self) -> None:
        """Known fields this server does not implement: refused (400) rather than dropped."""

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def seed_of(self, choice: int) -> int | None:
        """Choice i of n samples with seed + i: reproducible, and the n choices differ."""
        return None if self.seed is None else (self.seed + choice) % 2**63


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of either (one choice per prompt and n)")
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: score the prompt only")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and any(isinstance(p, (str, list)) and not p for p in v):
            raise ValueError("no prompt in the list may be empty")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice group: text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def check_supported(self) -> None:
        if self.best_of not in (None, self.n):
            raise Unsupported("best_of", "best_of: only best_of == n is supported (every sample is returned)")
        if self.suffix is not None:
            raise Unsupported("suffix", "suffix: not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise Unsupported("max_tokens", "max_tokens: 0 only with echo (scoring the prompt)")


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
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _limit(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    def check_supported(self) -> None:
        for param, ok in (("tools", not self.tools),
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

    def head(self, obj: str) -> dict:
        # system_fingerprint names the weights that answered: the adapter, and its step while it trains
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(obj), "choices": [], "usage": usage(prompt, completion)}
