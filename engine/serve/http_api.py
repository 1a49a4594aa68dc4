"""The OpenAI-compatible HTTP API, on aiohttp in a thread of its own.

aiohttp because it is already a dependency of the project (the operator's kopf uses it), streams
server-sent events natively, and cancels a handler when its client disconnects
(`handler_cancellation=True`), which is how a client that goes away frees its KV cache row: the
handler's `finally` cancels the request and the engine drops it at its next iteration.

Bounds (with engine/serve/listener.py's on connections): a body of at most MAX_BODY_BYTES that
arrives within BODY_TIMEOUT_S, and a streamed chunk a client does not take within WRITE_TIMEOUT_S
ends the response (and frees the request's KV cache row).

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
GET /health, GET /metrics. Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from pydantic import ValidationError

from muxtune.engine.serve import protocol
from muxtune.engine.serve.adapters import Unavailable
from muxtune.engine.serve.chat import encode_chat, encode_prompt
from muxtune.engine.serve.engine import Overloaded, ServeEngine
from muxtune.engine.serve.request import Delta, Done, Failed, GenerationRequest
from muxtune.engine.serve.sampling import SamplingParams

log = logging.getLogger("muxtune.serve")
MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 30.0


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.retry_after = status, kind, param, code, retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(protocol.error_body(str(self), self.kind, self.param, self.code),
                                 status=self.status, headers=headers)


def _failed(f: Failed) -> HttpError:
    kind = "invalid_request_error" if f.status < 500 else "server_error"
    return HttpError(f.status, f.message, kind, code="model_not_found" if f.status == 404 else None,
                     retry_after=5 if f.status == 503 else None)


class OpenAIApi:
    """Request handling; `tokenizer` is this thread's own copy (the engine thread decodes with another)."""

    def __init__(self, engine: ServeEngine, tokenizer, chat_template: str | None = None, metrics=None):
        self.engine, self.tokenizer, self.chat_template, self.metrics = engine, tokenizer, chat_template, metrics
        self.vocab = len(tokenizer)
        # tokenising a long prompt must not block the event loop; one worker keeps the tokenizer single-threaded
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="muxtune-tokenize")

    def app(self, *outer_middlewares) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[*outer_middlewares, self._errors])
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        if self.metrics is not None:
            app.router.add_get("/metrics", self.render_metrics)
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except HttpError as exc:
            if self.metrics is not None and exc.status in (400, 404, 429, 503):
                self.metrics.rejected(exc.status)
            return exc.response()
        except web.HTTPException as exc:  # aiohttp's own 404/405/413: in OpenAI's shape too
            if exc.status < 400:
                raise
            return HttpError(exc.status, exc.reason or "error").response()
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("request handler failed", extra={"path": request.path})
            return HttpError(500, "internal error", "server_error").response()

    async def health(self, request):
        return web.Response(text="ok\n")

    async def completions(self, request):
        return await self.generate(request, chat=False)

    async def chat_completions(self, request):
        return await self.generate(request, chat=True)

    # ----- models ----------------------------------------------------------------------------
    def _card(self, entry, parent: str | None) -> dict:
        card = {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "muxtune",
                "root": entry.root, "parent": parent, "max_model_len": self.engine.max_model_len, "permission": []}
        if entry.task_key is not None:
            card["muxtune"] = {"task": entry.task_key, "phase": entry.phase, "step": entry.step}
        return card

    async def list_models(self, request):
        reg = self.engine.registry
        cards = [self._card(reg.base, None)] + [self._card(e, reg.base_id) for e in reg.models()]
        return web.json_response({"object": "list", "data": cards})

    async def get_model(self, request):
        name = request.match_info["model"]
        entry = self._lookup(name)
        reg = self.engine.registry
        return web.json_response(self._card(entry, None if entry is reg.base else reg.base_id))

    async def render_metrics(self, request):
        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    def _lookup(self, name: str):
        try:
            entry = self.engine.registry.lookup(name)
        except Unavailable as exc:
            raise HttpError(404, str(exc), param="model", code="model_not_found") from None
        if entry is None:
            raise HttpError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return entry

    # ----- generation ------------------------------------------------------------------------
    def _parse(self, body, chat: bool):
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        cls = protocol.ChatCompletionRequest if chat else protocol.CompletionRequest
        try:
            req = cls.model_validate(body)
            req.check_supported()
        except ValidationError as exc:
            message, param = protocol.validation_message(exc)
            raise HttpError(400, message, param=param) from None
        except protocol.Unsupported as exc:
            raise HttpError(400, str(exc), param=exc.param) from None
        return req

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        if chat:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
            return encode_chat(self.tokenizer, messages, self.chat_template)
        if isinstance(req.prompt, str):
            return encode_prompt(self.tokenizer, req.prompt)
        bad = [t for t in req.prompt if not 0 <= t < self.vocab]
        if bad:
            raise HttpError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0-{self.vocab - 1})", param="prompt")
        return list(req.prompt)

    def _params(self, req, prompt_len: int) -> SamplingParams:
        limit, cap = self.engine.max_model_len, self.engine.limits.max_tokens
        if prompt_len >= limit:
            raise HttpError(400, f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len}.",
                            param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(cap, limit - prompt_len)
        if max_tokens > cap:
            raise HttpError(400, f"max_tokens: at most {cap} on this server", param="max_tokens")
        if prompt_len + max_tokens > limit:
            raise HttpError(400, f"This model's maximum context length is {limit} tokens; you requested "
                            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate).",
                            param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed_value, stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos)

    async def generate(self, request: web.Request, chat: bool):
        try:
            raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g}s") from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HttpError(400, "the request body is not valid JSON") from None
        req = self._parse(body, chat)
        entry = self._lookup(req.model)
        prompt_ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, self._prompt_ids, req, chat)
        params = self._params(req, len(prompt_ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # engine thread -> this loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop closed: the server is gone
                pass

        gen = GenerationRequest(model=entry, prompt_ids=prompt_ids, params=params, sink=sink)
        try:
            self.engine.submit(gen)
        except Overloaded as exc:
            kind = "rate_limit_error" if exc.status == 429 else "server_error"
            code = "rate_limit_exceeded" if exc.status == 429 else "service_unavailable"
            raise HttpError(exc.status, str(exc), kind, code=code, retry_after=exc.retry_after) from None
        ids = protocol.ResponseIds(chat, entry.name)
        try:
            if req.stream:
                return await self._stream(request, events, ids, req.include_usage, gen)
            return await self._collect(events, ids, gen)
        finally:
            if not gen.finished:  # the client left (or the handler failed): free its slot
                gen.cancel()
                self.engine.wakeup.set()

    async def _collect(self, events: asyncio.Queue, ids: protocol.ResponseIds, gen: GenerationRequest):
        parts = []
        while True:
            ev = await events.get()
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Done):
                parts.append(ev.text)
                ids.fingerprint = gen.fingerprint
                return web.json_response(ids.full("".join(parts), ev.finish_reason, ev.prompt_tokens,
                                                  ev.completion_tokens))
            elif isinstance(ev, Failed):
                raise _failed(ev)

    async def _stream(self, request, events: asyncio.Queue, ids: protocol.ResponseIds, include_usage: bool,
                      gen: GenerationRequest):
        first = await events.get()
        if isinstance(first, Failed):  # nothing sent yet: a proper HTTP error
            raise _failed(first)
        ids.fingerprint = gen.fingerprint
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self._send_events(resp, first, events, ids, include_usage)
        except asyncio.TimeoutError:  # the client stopped reading: drop it (the caller frees its row)
            log.info("stream dropped: the client stopped reading", extra={"model": ids.model})
            request.protocol.force_close()
        return resp

    @staticmethod
    async def _send_events(resp, ev, events: asyncio.Queue, ids: protocol.ResponseIds, include_usage: bool):
        async def send(obj) -> None:
            await asyncio.wait_for(resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n"), WRITE_TIMEOUT_S)

        opened = False
        while True:
            if isinstance(ev, Delta):
                await send(ids.chunk(ev.text, first=not opened))
                opened = True
            elif isinstance(ev, Done):
                if ev.text or not opened:
                    await send(ids.chunk(ev.text, first=not opened))
                await send(ids.chunk(None, ev.finish_reason))
                if include_usage:
                    await send(ids.usage_chunk(ev.prompt_tokens, ev.completion_tokens))
                break
            elif isinstance(ev, Failed):  # headers are gone: report in the stream, as OpenAI does
                await send(protocol.error_body(ev.message, "server_error"))
                break
            ev = await events.get()
        await asyncio.wait_for(resp.write(b"data: [DONE]\n\n"), WRITE_TIMEOUT_S)
        await asyncio.wait_for(resp.write_eof(), WRITE_TIMEOUT_S)

