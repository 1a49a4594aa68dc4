"""A small async Kubernetes REST client (aiohttp, already a kopf dependency).

Why not the `kubernetes` package's client: its calls are blocking (threads per request) and the
operator wants to count every request it makes (the scale test reports API requests per task).
Credentials come from that package's loaders (operator/credentials.py: kubeconfig with exec
plugins, or in-cluster), refreshed before every request; kopf logs in with the same ones.
"""
from __future__ import annotations

import collections
import json
from typing import Any

import aiohttp

from muxtune.operator.credentials import KubeCredentials

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: {status} {msg}")

    @property
    def reason(self) -> str:
        return self.body.get("reason", "") if isinstance(self.body, dict) else ""

    @property
    def message(self) -> str:
        """The API server's own words (e.g. an admission plugin's refusal)."""
        return (self.body.get("message") if isinstance(self.body, dict) else str(self.body)[:300]) or ""


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    p = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        p += f"/{name}"
    if subresource:
        p += f"/{subresource}"
    return p


def _resource_of(path: str) -> str:
    """'pods', 'finetunetasks/status', ... for request counting."""
    parts = [p for p in path.split("/") if p]
    parts = parts[2:] if parts[0] == "api" else parts[3:]
    if len(parts) >= 2 and parts[0] == "namespaces" and len(parts) > 2:
        parts = parts[2:]
    res = parts[0]
    return f"{res}/{parts[2]}" if len(parts) > 2 else res


class KubeClient:
    """JSON over HTTPS with request counting by (verb, resource)."""

    def __init__(self, creds: KubeCredentials, user_agent: str = "muxtune-operator"):
        self.creds = creds
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None
        self._ua = user_agent
        self.on_request = None  # callable(verb, resource), e.g. a metrics counter
        # Namespaces writes may go to (None: any). Defence in depth for --namespaces: even a bug or a
        # crafted object cannot make the operator create or change things elsewhere.
        self.writable_namespaces: set[str] | None = None

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": self._ua, "Accept": "application/json"}
            self._session = aiohttp.ClientSession(
                base_url=None,
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=self.creds.ssl_context(), limit=16),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self.creds.close()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json") -> Any:
        if method != "GET" and self.writable_namespaces is not None:
            parts = path.split("/")
            ns = parts[parts.index("namespaces") + 1] if "namespaces" in parts[:-1] else None
            if ns is not None and ns not in self.writable_namespaces:
                raise ApiError(403, {"message": f"the operator does not act in namespace {ns!r} (--namespaces)"}, method, path)
        s = await self.session()
        res = _resource_of(path)
        self.calls[(method, res)] += 1
        if self.on_request is not None:
            self.on_request(method, res)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        token = self.creds.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with s.request(method, self.creds.server + path, data=data, params=params, headers=headers) as r:
            text = await r.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if r.status >= 400:
                raise ApiError(r.status, payload, method, path)
            return payload

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict:
        return await self.request("GET", resource_path(api_version, plural, namespace, name))

    async def list(self, api_version: str, plural: str, namespace: str | None = None, **params) -> dict:
        return await self.request("GET", resource_path(api_version, plural, namespace), params=params or None)

    async def create(self, api_version: str, plural: str, namespace: str | None, body: dict) -> dict:
        return await self.request("POST", resource_path(api_version, plural, namespace), body,
                                  params={"fieldManager": "muxtune-operator"})

    async def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: dict,
                    subresource: str | None = None) -> dict:
        return await self.request("PATCH", resource_path(api_version, plural, namespace, name, subresource), patch,
                                  params={"fieldManager": "muxtune-operator"}, content_type=MERGE_PATCH)

    async def replace(self, api_version: str, plural: str, namespace: str | None, name: str, body: dict) -> dict:
        return await self.request("PUT", resource_path(api_version, plural, namespace, name), body,
                                  params={"fieldManager": "muxtune-operator"})

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str,
                     propagation: str = "Background") -> dict | None:
        try:
            return await self.request("DELETE", resource_path(api_version, plural, namespace, name),
                                      {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create_or_adopt(self, api_version: str, plural: str, namespace: str | None, body: dict) -> tuple[dict, bool]:
        """Create; on 409 AlreadyExists read the existing object. Returns (object, created)."""
        try:
            return await self.create(api_version, plural, namespace, body), True
        except ApiError as e:
            if e.status != 409:
                raise
        return await self.get(api_version, plural, namespace, body["metadata"]["name"]), False
