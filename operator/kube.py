"""A small async Kubernetes REST client (aiohttp, already a kopf dependency).

Why not the `kubernetes` package: its calls are blocking (threads per request) and the operator
wants to count every request it makes (the scale test reports API requests per task). Credentials
come from a kubeconfig (KUBECONFIG or --kubeconfig) or the in-cluster ServiceAccount, and the same
credentials are handed to kopf through its login hook, so both speak as the same identity.
"""
from __future__ import annotations

import base64
import collections
import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


@dataclass
class Credentials:
    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    namespace: str | None = None
    token_path: str | None = None  # re-read when it changes (projected ServiceAccount tokens rotate)


def _materialise(data_b64: str, suffix: str) -> str:
    f = tempfile.NamedTemporaryFile(prefix="muxtune-kube-", suffix=suffix, delete=False)
    f.write(base64.b64decode(data_b64))
    f.close()
    os.chmod(f.name, 0o600)
    return f.name


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if not path and (SA_DIR / "token").exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"
        ns = (SA_DIR / "namespace").read_text().strip() if (SA_DIR / "namespace").exists() else None
        return Credentials(
            server=f"https://{host}:{port}",
            ca_path=str(SA_DIR / "ca.crt"),
            token=(SA_DIR / "token").read_text().strip(),
            namespace=ns,
            token_path=str(SA_DIR / "token"),
        )
    path = path or str(Path.home() / ".kube" / "config")
    cfg = yaml.safe_load(Path(path).read_text())
    base = Path(path).parent
    ctx_name = cfg.get("current-context")
    ctx = next((c["context"] for c in cfg.get("contexts", []) if c["name"] == ctx_name), None)
    if ctx is None:
        ctx = cfg["contexts"][0]["context"]
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {}) or {}

    def file_or_data(key: str, suffix: str, src: dict) -> str | None:
        if src.get(f"{key}-data"):
            return _materialise(src[f"{key}-data"], suffix)
        if src.get(key):
            p = Path(src[key])
            return str(p if p.is_absolute() else base / p)
        return None

    token = user.get("token")
    token_path = None
    if not token and user.get("tokenFile"):
        token_path = user["tokenFile"]
        token = Path(token_path).read_text().strip()
    return Credentials(
        server=cluster["server"].rstrip("/"),
        ca_path=file_or_data("certificate-authority", ".crt", cluster),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=token,
        cert_path=file_or_data("client-certificate", ".crt", user),
        key_path=file_or_data("client-key", ".key", user),
        namespace=ctx.get("namespace"),
        token_path=token_path,
    )


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: {status} {msg}")

    @property
    def reason(self) -> str:
        return self.body.get("reason", "") if isinstance(self.body, dict) else ""


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

    def __init__(self, creds: Credentials, user_agent: str = "muxtune-operator"):
        self.creds = creds
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None
        self._ua = user_agent
        self.on_request = None  # callable(verb, resource), e.g. a metrics counter

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.creds.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.creds.ca_path) if self.creds.ca_path else ssl.create_default_context()
        if self.creds.cert_path and self.creds.key_path:
            ctx.load_cert_chain(self.creds.cert_path, self.creds.key_path)
        return ctx

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": self._ua, "Accept": "application/json"}
            self._session = aiohttp.ClientSession(
                base_url=None,
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=16),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _token(self) -> str | None:
        c = self.creds
        if c.token_path:
            try:
                mtime = os.stat(c.token_path).st_mtime
                if mtime != getattr(self, "_token_mtime", None):
                    c.token = Path(c.token_path).read_text().strip()
                    self._token_mtime = mtime
            except OSError:
                pass
        return c.token

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json") -> Any:
        s = await self.session()
        res = _resource_of(path)
        self.calls[(method, res)] += 1
        if self.on_request is not None:
            self.on_request(method, res)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        token = self._token()
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
