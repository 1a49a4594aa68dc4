"""Who is asking: per-namespace bearer tokens on the serving port (a pod of a cluster group).

The operator gives each tenant namespace a serving token (a Secret in that namespace, readable
by the namespace's `edit` users and by no other tenant) and gives the engine only the tokens'
SHA-256 digests: a JSON file ``{"<sha256 hex of token>": "<namespace>", ...}`` mounted read-only
(``--serve-tokens FILE``). With the file configured, every request but ``/health`` must carry
``Authorization: Bearer <token>``; a caller then sees only its namespace's adapters (served as
``<namespace>/<task>``) and the shared base model: ``/v1/models`` lists only those, and a request
or card for another namespace's adapter gets the same 404 as a model that does not exist (its
existence is not revealed). ``/metrics`` of the serving port names every member: not for
tenants (Prometheus scrapes the metrics port). Without the file (``muxtune serve``, ``muxtune run
--serve-port`` on a workstation) nothing changes.

One aiohttp middleware, ahead of the API's own, so the handlers stay unaware of tenancy.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from aiohttp import web

from muxtune.engine.serve import protocol
from muxtune.facts.trust import token_digest

OPEN_PATHS = frozenset({"/health"})
BODY_TIMEOUT_S = 30.0


class TenantTokens:
    """sha256(token) -> namespace, re-read when the mounted file changes (a Secret update)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._map: dict[str, str] = {}
        self._load()  # a missing or malformed file fails at startup, not at the first request

    def _load(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"{self.path}: expected a JSON object of sha256 hex digest -> namespace")
        self._map, self._stamp = {k.lower(): v for k, v in data.items()}, stamp

    def namespace_of(self, authorization: str | None) -> str | None:
        """The namespace a bearer token speaks for, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            self._load()
        except (OSError, ValueError):
            pass  # a file being replaced: keep the last good map
        return self._map.get(token_digest(token.strip()))


def owns(namespace: str, model: str, base_id: str) -> bool:
    """The base model is everyone's; an adapter belongs to the namespace it is served under."""
    return model == base_id or model.startswith(namespace + "/")


def _error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> web.Response:
    return web.json_response(protocol.error_body(message, kind, param, code), status=status, headers=headers)


def _not_found(model: str) -> web.Response:
    """Word for word the API's answer for a model that does not exist."""
    return _error(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found", "model")


def tenant_middleware(tokens: TenantTokens, base_id: str):
    """The aiohttp middleware: authenticate once, then keep the caller inside its namespace."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path in OPEN_PATHS:
            return await handler(request)
        ns = tokens.namespace_of(request.headers.get("Authorization"))
        if ns is None:
            return _error(401, "a serving token of your namespace is required (Authorization: Bearer <token>)",
                          "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if request.path == "/v1/models":
            return _only_own(await handler(request), ns, base_id)
        if request.path.startswith("/v1/models/"):
            model = request.path[len("/v1/models/"):]
            return await handler(request) if owns(ns, model, base_id) else _not_found(model)
        if request.method == "POST" and request.path.startswith("/v1/"):
            model = await _requested_model(request)
            if model is not None and not owns(ns, model, base_id):
                return _not_found(model)
            return await handler(request)
        if request.path.startswith("/v1/"):
            return await handler(request)
        return _error(404, "Not Found", "invalid_request_error")  # /metrics and the like: not for tenants

    return middleware


async def _requested_model(request: web.Request) -> str | None:
    """The body's "model" (aiohttp keeps the body for the handler); None when the handler will refuse it."""
    try:
        body = json.loads(await asyncio.wait_for(request.read(), BODY_TIMEOUT_S))
    except (asyncio.TimeoutError, ValueError, UnicodeDecodeError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _only_own(resp: web.StreamResponse, ns: str, base_id: str) -> web.StreamResponse:
    if not isinstance(resp, web.Response) or resp.status != 200 or resp.body is None:
        return resp
    listing = json.loads(resp.body)
    listing["data"] = [m for m in listing.get("data", []) if owns(ns, str(m.get("id", "")), base_id)]
    return web.json_response(listing)
