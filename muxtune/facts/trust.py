"""What an engine pod and the operator trust of each other (stdlib only: the operator image has no engine).

The group's ConfigMap and the pod's annotations live where tenants may write them, so neither side
trusts the other's bytes without a MAC made with the group's key (HMAC-SHA256; the operator
derives one key per BackboneGroup from its own master key and mounts it into the group's pods
from a Secret):

* tasks file: the operator writes ``tasks.yaml`` and ``tasks.yaml.sig`` (group, revision and the
  SHA-256 of tasks.yaml, with their MAC). The engine applies a tasks file only when the MAC
  verifies, the group is its own and the revision does not go back.
* report: the engine's ``/v1/status`` carries ``auth`` (group, time, MAC over the canonical JSON);
  the operator accepts a report only when it verifies with the key of the group it polled.

A local run (no ``MUXTUNE_GROUP_KEY_FILE``) checks nothing. What this does and does not protect
against is written down in docs/SECURITY-MODEL.md.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Callable

ENV_KEY_FILE = "MUXTUNE_GROUP_KEY_FILE"
ENV_GROUP = "MUXTUNE_GROUP"
SIG_SUFFIX = ".sig"


class TrustError(ValueError):
    """A tasks file or report that does not verify; the message says why."""


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def token_digest(token: str) -> str:
    """What the engine is given of a serving bearer token (operator/isolation.py, engine/serve/tenant_auth.py)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _mac(key: bytes, kind: str, *parts: str | bytes) -> str:
    h = hmac.new(key, kind.encode(), hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()


def sign_tasks(key: bytes, group: str, revision: int, text: str | bytes) -> str:
    """The ``tasks.yaml.sig`` document for ``text``."""
    digest = hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()
    env = {"group": group, "revision": int(revision), "sha256": digest}
    env["mac"] = _mac(key, "tasks", group, str(int(revision)), digest)
    return json.dumps(env, sort_keys=True)


def read_signature(sig_text: str | bytes | None) -> dict | None:
    try:
        env = json.loads(sig_text or "")
    except ValueError:
        return None
    return env if isinstance(env, dict) else None


def verify_tasks(key: bytes, group: str, text: bytes, sig_text: bytes | str | None, min_revision: int = 0) -> int:
    """The revision of a tasks file that verifies; TrustError otherwise."""
    env = read_signature(sig_text)
    if env is None:
        raise TrustError("the tasks file has no readable signature (tasks.yaml.sig)")
    rev = env.get("revision")
    if not isinstance(rev, int) or isinstance(rev, bool):
        raise TrustError("the tasks file signature has no integer revision")
    want = _mac(key, "tasks", str(env.get("group")), str(rev), str(env.get("sha256")))
    if not hmac.compare_digest(want, str(env.get("mac"))):
        raise TrustError("the tasks file signature does not verify with the group's key")
    if env.get("group") != group:
        raise TrustError(f"the tasks file was signed for group {env.get('group')!r}, not {group!r}")
    if not hmac.compare_digest(hashlib.sha256(text).hexdigest(), str(env.get("sha256"))):
        raise TrustError("the tasks file differs from the one the operator signed")
    if rev < min_revision:
        raise TrustError(f"the tasks file revision {rev} is older than the applied revision {min_revision}")
    return rev


def sign_report(key: bytes, group: str, payload: dict, now: float | None = None) -> dict:
    body = {k: v for k, v in payload.items() if k != "auth"}
    t = time.time() if now is None else now
    return {**body, "auth": {"group": group, "time": t, "mac": _mac(key, "report", group, repr(float(t)), canonical(body))}}


def verify_report(key: bytes, group: str, payload: dict) -> tuple[dict, float]:
    """(report without its auth, the time it was signed); TrustError unless the group's key made it."""
    auth = payload.get("auth") if isinstance(payload, dict) else None
    if not isinstance(auth, dict) or not isinstance(auth.get("time"), (int, float)):
        raise TrustError("unsigned report")
    body = {k: v for k, v in payload.items() if k != "auth"}
    want = _mac(key, "report", str(auth.get("group")), repr(float(auth["time"])), canonical(body))
    if not hmac.compare_digest(want, str(auth.get("mac"))):
        raise TrustError("report signature does not verify with the group's key")
    if auth.get("group") != group:
        raise TrustError(f"report signed for group {auth.get('group')!r}, not {group!r}")
    return body, float(auth["time"])


def signature_path(path: Path | str) -> Path:
    return Path(f"{path}{SIG_SUFFIX}")


class Guard:
    """The engine's side: verifies task files before they are applied and signs its reports."""

    def __init__(self, key: bytes, group: str):
        self.key, self.group = key, group
        self.revision = 0

    @classmethod
    def from_env(cls) -> Guard | None:
        path = os.environ.get(ENV_KEY_FILE)
        if not path:
            return None
        group = os.environ.get(ENV_GROUP, "")
        try:
            key = Path(path).read_text().strip().encode()
        except OSError as exc:
            raise TrustError(f"{ENV_KEY_FILE}={path}: cannot read the group key: {exc}") from None
        if not key or not group:
            raise TrustError(f"{ENV_KEY_FILE} and {ENV_GROUP} must both be set and non-empty")
        return cls(key, group)

    def check(self, paths: list[Path]) -> None:
        """Raise TrustError unless every file verifies; then remember the newest revision."""
        revs = []
        for p in paths:
            try:
                text, sig = Path(p).read_bytes(), signature_path(p).read_bytes()
            except OSError as exc:
                raise TrustError(f"{p}: {exc}") from None
            try:
                revs.append(verify_tasks(self.key, self.group, text, sig, self.revision))
            except TrustError as exc:
                raise TrustError(f"{p}: {exc}") from None
        self.revision = max([self.revision, *revs])

    def signed(self, status: Callable[[], dict]) -> Callable[[], dict]:
        return lambda: sign_report(self.key, self.group, status())


_ACTIVE: list[Guard | None] = []


def active() -> Guard | None:
    """The process's guard (from the environment), created once."""
    if not _ACTIVE:
        _ACTIVE.append(Guard.from_env())
    return _ACTIVE[0]
