"""Per-group HMAC keys (muxtune/facts/trust.py), derived from the operator's master key.

key(group) = HMAC-SHA256(master, "<namespace>/<name>/<uid>"): every group object has its own key,
the operator never needs to read a key back from the cluster (it only creates the group's
Secret), and a key learnt from one group's Secret says nothing about any other group's. The
master key comes from --signing-key-file (the chart mounts a Secret of the operator's namespace
that tenants cannot read); without it a random key per process is used, which breaks the
signatures of running groups on every restart (fine for a test, not for a cluster).

The status token (:func:`load_status_token`) guards every engine's /metrics and /v1/status: the
operator polls with it, Prometheus scrapes with it (the chart's Secret), engines get only its
SHA-256 (:func:`status_token_sha256`), so an engine pod in a tenant's namespace never holds it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

log = logging.getLogger("muxtune.operator")


class GroupKeys:
    def __init__(self, master: bytes):
        if len(master) < 16:
            raise ValueError("the signing key must have at least 16 bytes")
        self._master = master

    @classmethod
    def from_file(cls, path: str | None) -> GroupKeys:
        if path:
            return cls(Path(path).read_bytes().strip())
        log.warning("no --signing-key-file: using a random per-process key; running groups stop "
                    "verifying after an operator restart")
        return cls(secrets.token_hex(32).encode())

    def serving_token(self, namespace: str) -> str:
        """The namespace's bearer token on serving ports (operator/isolation.py): derived, never read back."""
        return hmac.new(self._master, f"serving-token/{namespace}".encode(), hashlib.sha256).hexdigest()

    def key(self, group: dict) -> bytes:
        m = group["metadata"]
        msg = f"{m['namespace']}/{m['name']}/{m.get('uid') or ''}".encode()
        return hmac.new(self._master, msg, hashlib.sha256).hexdigest().encode()


def load_status_token(path: str | None) -> str:
    """The bearer token of the engines' status port: --status-token-file (the chart's Secret, kept
    across upgrades), else a random one per process (running groups' polls then fail after an
    operator restart, as their reports do without --signing-key-file)."""
    if path:
        token = Path(path).read_text().strip()
        if len(token) < 16:
            raise ValueError("the status token must have at least 16 characters")
        return token
    log.warning("no --status-token-file: using a random per-process status token; Prometheus cannot scrape engines "
                "and running groups stop answering polls after an operator restart")
    return secrets.token_hex(32)


def status_token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
