"""What every generation endpoint shares (vLLM's serving_engine): parse and check a request, turn
its prompts x n into engine requests (one KV cache row each, submitted together or not at all),
gather their events per choice, and answer in one JSON body or as server-sent events.

A client that goes away (the handler is cancelled, or a write finds the connection reset) is no
error: its requests are cancelled, their rows freed at the engine's next iteration, and the
disconnect is counted (muxtune_serve_client_disconnects_total), with no traceback.
Endpoints (serving_completion.py, serving_chat.py) say how prompts are made and answers rendered.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import ValidationError

from muxtune.engine.serve import protocol
from muxtune.engine.serve.engine import Overloaded
from muxtune.engine.serve.errors import HttpError, failed
from muxtune.engine.serve.request import Delta, Done, Failed, GenerationRequest
from muxtune.engine.serve.sampling import SamplingParams

log = logging.getLogger("muxtune.serve")
BODY_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 30.0


async def read_json(request: web.Request) -> dict:
    """The request's JSON object body (400 for anything else, 408 when it does not arrive)."""
    try:
        raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g}s") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HttpError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body


@dataclass
class Choice:
    """One answer: prompt p's sample i, its engine request and what came back so far."""

    index: int
    prompt: int  # which prompt of the request
    prompt_ids: list[int]
    prompt_text: str | None  # the prompt as text (echo)
    gen: GenerationRequest | None = None
    parts: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    done: Done | None = None
    opened: bool = False  # a stream chunk went out for it

    @property
    def text(self) -> str:
        return "".join(self.parts)


class OpenAIServing:
    """The shared request path; subclasses set `request_class` and render answers."""

    request_class: type = protocol.ChatCompletionRequest
    chat = False

    def __init__(self, engine, tokenizer, metrics=None, tokenize_pool=None):
        self.engine, self.tokenizer, self.metrics, self._tokenize = engine, tokenizer, metrics, tokenize_pool
        self.vocab = len(tokenizer)

    # ----- hooks -----------------------------------------------------------------------------
    def make_choices(self, req) -> list[Choice]:
        raise NotImplementedError

    def logprob_counts(self, req) -> tuple[int | None, int | None]:
        """(top alternatives per generated token, per prompt token); None: not wanted."""
        return None, None

    def render_full(self, ids: protocol.ResponseIds, req, choices: list[Choice]) -> dict:
        raise NotImplementedError

    def render_chunk(self, ids: protocol.ResponseIds, req, choice: Choice, text: str, entries: list,
                     finish: str | None) -> dict:
        raise NotImplementedError

    # ----- the request path ------------------------------------------------------------------
    async def __call__(self, request: web.Request, lookup) -> web.StreamResponse:
        req = self._parse(await read_json(request))
        entry = lookup(req.model)
        loop = asyncio.get_running_loop()
        choices = await loop.run_in_executor(self._tokenize, self.make_choices, req)
        events: asyncio.Queue = asyncio.Queue()
        gens = [self._request(req, entry, c, loop, events) for c in choices]
        try:
            self.engine.submit_all(gens)
        except Overloaded as exc:
            kind = "rate_limit_error" if exc.status == 429 else "server_error"
            code = "rate_limit_exceeded" if exc.status == 429 else "service_unavailable"
            raise HttpError(exc.status, str(exc), kind, code=code, retry_after=exc.retry_after) from None
        ids = protocol.ResponseIds(self.chat, entry.name)
        gone = True  # until the answer went out whole: a cancellation or reset means the client left
        try:
            if req.stream:
                resp, gone = await self._stream(request, req, events, ids, choices)
            else:
                resp, gone = await self._collect(req, events, ids, choices), False
            return resp
        except HttpError:
            gone = False
            raise
        finally:
            self._cancel_unfinished(choices, entry.name if gone else None)

    def _cancel_unfinished(self, choices: list[Choice], gone_model: str | None) -> None:
        left = [c.gen for c in choices if not c.gen.finished]
        for g in left:  # the client left (or the handler failed): free their rows
            g.cancel()
        if left:
            self.engine.wakeup.set()
        if gone_model is not None and self.metrics is not None:
            self.metrics.disconnected(gone_model)

    def _parse(self, body: dict):
        try:
            req = self.request_class.model_validate(body)
            req.check_supported()
        except ValidationError as exc:
            message, param = protocol.validation_message(exc)
            raise HttpError(400, message, param=param) from None
        except protocol.Unsupported as exc:
            raise HttpError(400, str(exc), param=exc.param) from None
        if req.logit_bias:
            bad = next((k for k in req.logit_bias if not 0 <= int(k) < self.vocab), None)
            if bad is not None:
                raise HttpError(400, f"logit_bias: token id {bad} is outside the vocabulary", param="logit_bias")
        bad = next((t for t in req.stop_token_ids or () if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise HttpError(400, f"stop_token_ids: token id {bad} is outside the vocabulary", param="stop_token_ids")
        return req

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise HttpError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0-{self.vocab - 1})", param=param)
        return ids

    def params(self, req, prompt_len: int, choice: int) -> SamplingParams:
        limit, cap = self.engine.max_model_len, self.engine.limits.max_tokens
        param = "messages" if self.chat else "prompt"
        if prompt_len > limit or (prompt_len == limit and req.max_tokens != 0):
            raise HttpError(400, f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len}.",
                            param=param, code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(cap, limit - prompt_len)
        if max_tokens > cap:
            raise HttpError(400, f"max_tokens: at most {cap} on this server", param="max_tokens")
        if prompt_len + max_tokens > limit:
            raise HttpError(400, f"This model's maximum context length is {limit} tokens; you requested "
                            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate).",
                            param="max_tokens", code="context_length_exceeded")
        top, prompt_top = self.logprob_counts(req)
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
            seed=req.seed_of(choice), stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, min_tokens=min(req.min_tokens, max_tokens),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            logit_bias=tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items()),
            logprobs=top, prompt_logprobs=prompt_top)

    def _request(self, req, entry, c: Choice, loop, events: asyncio.Queue) -> GenerationRequest:
        def sink(event, index=c.index) -> None:  # engine thread -> this loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the loop closed: the server is gone
                pass

        c.gen = GenerationRequest(model=entry, prompt_ids=c.prompt_ids,
                                  params=self.params(req, len(c.prompt_ids), c.index % req.n), sink=sink)
        return c.gen

    # ----- answers ---------------------------------------------------------------------------
    @staticmethod
    def _take(c: Choice, ev) -> tuple[str, list]:
        """Fold one event into its choice: (new text, new logprob entries)."""
        text, entries = ev.text, list(ev.logprobs)
        c.parts.append(text)
        c.logprobs += entries
        if isinstance(ev, Done):
            c.done = ev
        return text, entries

    async def _collect(self, req, events: asyncio.Queue, ids, choices: list[Choice]) -> web.Response:
        left = len(choices)
        while left:
            index, ev = await events.get()
            if isinstance(ev, Failed):
                raise failed(ev)
            self._take(choices[index], ev)
            left -= isinstance(ev, Done)
        ids.fingerprint = choices[0].gen.fingerprint
        return web.json_response(self.render_full(ids, req, choices))

    async def _stream(self, request, req, events: asyncio.Queue, ids,
                      choices: list[Choice]) -> tuple[web.StreamResponse, bool]:
        """The streamed answer, and whether the client went away before its end."""
        index, first = await events.get()
        if isinstance(first, Failed):  # nothing sent yet: a proper HTTP error
            raise failed(first)
        ids.fingerprint = choices[index].gen.fingerprint
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self._send_events(resp, req, (index, first), events, ids, choices)
        except asyncio.TimeoutError:  # the client stopped reading: drop it (the caller frees its rows)
            log.info("stream dropped: the client stopped reading", extra={"model": ids.model})
            if request.protocol is not None:
                request.protocol.force_close()
            return resp, True
        except ConnectionError:  # the client closed the stream early: counted by the caller, no traceback
            return resp, True
        return resp, False

    async def _send_events(self, resp, req, item, events: asyncio.Queue, ids, choices: list[Choice]) -> None:
        async def send(obj) -> None:
            await asyncio.wait_for(resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n"), WRITE_TIMEOUT_S)

        left = len(choices)
        while True:
            index, ev = item
            c = choices[index]
            if isinstance(ev, Failed):  # headers are gone: report in the stream, as OpenAI does
                await send(protocol.error_body(ev.message, "server_error"))
                break
            text, entries = self._take(c, ev)
            if text or entries or not c.opened:
                await send(self.render_chunk(ids, req, c, text, entries, None))
                c.opened = True
            if isinstance(ev, Done):
                await send(self.render_chunk(ids, req, c, "", [], ev.finish_reason))
                left -= 1
                if not left:
                    if req.include_usage:
                        await send(ids.usage_chunk(*self.usage(choices)))
                    break
            item = await events.get()
        await asyncio.wait_for(resp.write(b"data: [DONE]\n\n"), WRITE_TIMEOUT_S)
        await asyncio.wait_for(resp.write_eof(), WRITE_TIMEOUT_S)

    @staticmethod
    def usage(choices: list[Choice]) -> tuple[int, int]:
        """(prompt tokens, counted once per prompt; generated tokens over all choices)."""
        prompts = {c.prompt: len(c.prompt_ids) for c in choices}
        return sum(prompts.values()), sum(c.done.completion_tokens if c.done else 0 for c in choices)
