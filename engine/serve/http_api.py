"""The OpenAI-compatible HTTP API, on aiohttp in a thread of its own: the router (vLLM's api_server).

aiohttp because it is already a dependency of the project (the operator's kopf uses it), streams
server-sent events natively, and cancels a handler when its client disconnects
(`handler_cancellation=True`), which is how a client that goes away frees its KV cache rows.

Every request passes one middleware chain (`app(*outer_middlewares)`: a check that belongs to every
route, such as authentication, goes there) and then `_errors`, which turns failures into OpenAI's
error shape. Generation endpoints live in their own modules (serving_completion.py, serving_chat.py,
their shared path in serving.py); this file only routes.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
GET /health, GET /metrics; with `adapter_loading` (serving_models.py) also POST /v1/load_lora_adapter
and /v1/unload_lora_adapter. Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from muxtune.engine.serve.adapters import Unavailable
from muxtune.engine.serve.engine import ServeEngine
from muxtune.engine.serve.errors import HttpError
from muxtune.engine.serve.serving_chat import ChatServing
from muxtune.engine.serve.serving_completion import CompletionServing

log = logging.getLogger("muxtune.serve")
MAX_BODY_BYTES = 4 << 20


class OpenAIApi:
    """Request handling; `tokenizer` is this thread's own copy (the engine thread decodes with another)."""

    def __init__(self, engine: ServeEngine, tokenizer, chat_template: str | None = None, metrics=None,
                 adapter_loading=None):
        self.engine, self.tokenizer, self.chat_template, self.metrics = engine, tokenizer, chat_template, metrics
        self.adapter_loading = adapter_loading
        # tokenising a long prompt must not block the event loop; one worker keeps the tokenizer single-threaded
        pool = ThreadPoolExecutor(1, thread_name_prefix="muxtune-tokenize")
        self.completion = CompletionServing(engine, tokenizer, metrics, pool)
        self.chat = ChatServing(engine, tokenizer, metrics, pool, chat_template)

    def app(self, *outer_middlewares) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[*outer_middlewares, self._errors])
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        if self.adapter_loading is not None:
            self.adapter_loading.add_routes(app.router)
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
        return await self.completion(request, self._lookup)

    async def chat_completions(self, request):
        return await self.chat(request, self._lookup)

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
