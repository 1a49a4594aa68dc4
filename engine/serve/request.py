"""A generation request as the engine sees it, and the events it sends back to its client.

The HTTP thread builds a request and reads its events; the engine thread owns everything else.
Events cross threads through `sink`, a callable the HTTP side makes thread-safe.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from muxtune.engine.serve.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Delta:
    text: str
    tokens: int  # generated tokens so far
    logprobs: list = field(default_factory=list)  # logprobs.TokenLogprob of the tokens since the last event


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    text: str  # what is left to send
    prompt_tokens: int
    completion_tokens: int
    logprobs: list = field(default_factory=list)  # the generated tokens' not sent yet
    prompt_logprobs: list | None = None  # every prompt token's (echo with logprobs), the first without one


@dataclass
class Failed:
    status: int
    message: str
    kind: str = "server_error"


class IncrementalText:
    """Generated ids -> text to send: holds back a partial UTF-8 character and any tail that could
    still become a stop string, and cuts the text at the first stop string (which is not sent)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """New text safe to send, and whether a stop string ended the generation."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                out, self.sent = self.text[self.sent:cut], cut
                self.text = self.text[:cut]
                return out, True
        safe = len(self.text) - self.hold
        partial = len(self.text) - len(self.text.rstrip("\ufffd"))
        if partial:  # byte-level tokens that end inside a character (up to 3 bytes) may still complete it
            safe = min(safe, len(self.text) - min(partial, 3))
        if safe <= self.sent:
            return "", False
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def rest(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass(eq=False)
class GenerationRequest:
    model: object  # adapters.ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[object], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrival: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_ids))  # FIFO order
    # ----- engine-side state ---------------------------------------------------------------
    version: object = None  # adapters.AdapterVersion while admitted
    row: int | None = None  # KV cache row while admitted
    virtual: int = 0  # prompt tuning: virtual positions in front of the prompt (set at admission)
    prefilled: int = 0  # positions (virtual, then prompt) already in the cache
    output_ids: list[int] = field(default_factory=list)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    generator: object = None
    text: IncrementalText | None = None
    adapter_step: int | None = None  # the optimizer step of the version it uses (training tasks)
    fingerprint: str | None = None  # which weights answered: model, or model@step-N
    prompt_logprobs: list = field(default_factory=list)  # logprobs.TokenLogprob per prompt token so far
    pending_logprobs: list = field(default_factory=list)  # generated tokens' entries not sent yet
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away (any thread): the engine drops the request at its next iteration."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefix_len(self) -> int:
        """Cache positions before the first generated token: the virtual tokens and the prompt."""
        return self.virtual + len(self.prompt_ids)

    def prefix_tokens(self, start: int, n: int) -> list[int]:
        """Cache positions [start, start + n) of the prefix: virtual token k is id -(k + 1), which the
        serving forward embeds with the request's own prompt (engine/peft/prompt_tuning.py)."""
        head = [-(k + 1) for k in range(start, min(start + n, self.virtual))]
        return head + self.prompt_ids[max(0, start - self.virtual):max(0, start + n - self.virtual)]

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prefix_len

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        n = len(self.output_ids)
        if n < 2 or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (n - 1)
