"""Leader election over a coordination.k8s.io/v1 Lease, as client-go does it.

Every replica keeps its watches and caches warm; only the holder of the Lease reconciles, polls
engines and writes. The holder renews every ``renew_interval``; it stops acting as leader as soon
as it has not renewed for ``2/3 * lease_duration`` (before any other replica may take over). A
replica takes the Lease over when its record (holder, renewTime) has not changed for a whole
``lease_duration`` of its own clock; updates carry the resourceVersion, so two candidates never
both win.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

from muxtune.operator.kube import ApiError, KubeClient

log = logging.getLogger("muxtune.operator")
API = "coordination.k8s.io/v1"


def _micro_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str,
                 lease_duration: float = 15.0, renew_interval: float = 2.0, on_change=None):
        self.client, self.namespace, self.name, self.identity = client, namespace, name, identity
        self.duration, self.renew_interval = lease_duration, renew_interval
        self.on_change = on_change
        self._valid_until = 0.0
        self._leading = False
        self._observed: tuple | None = None
        self._observed_at = 0.0

    @property
    def is_leader(self) -> bool:
        return self._leading and time.monotonic() < self._valid_until

    def _set(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            log.warning("%s leadership of lease %s/%s (%s)", "acquired" if leading else "lost",
                        self.namespace, self.name, self.identity)
            if self.on_change:
                self.on_change(leading)

    def _body(self, transitions: int, acquire: str | None, rv: str | None = None) -> dict:
        now = _micro_now()
        meta = {"name": self.name, "namespace": self.namespace}
        if rv:
            meta["resourceVersion"] = rv
        return {"apiVersion": API, "kind": "Lease", "metadata": meta,
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(max(1, round(self.duration))),
                         "acquireTime": acquire or now, "renewTime": now, "leaseTransitions": transitions}}

    async def try_acquire_or_renew(self) -> bool:
        start = time.monotonic()
        try:
            lease = await self.client.get(API, "leases", self.namespace, self.name)
        except ApiError as e:
            if e.status != 404:
                raise
            try:
                await self.client.create(API, "leases", self.namespace, self._body(0, None))
            except ApiError as e2:
                if e2.status == 409:
                    return False
                raise
            self._valid_until = start + self.duration * 2 / 3
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, start
        if holder and holder != self.identity and start - self._observed_at < self.duration:
            return False  # someone else holds a live lease
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1)
        acquire = spec.get("acquireTime") if holder == self.identity else None
        try:
            await self.client.replace(API, "leases", self.namespace, self.name,
                                      self._body(transitions, acquire, lease["metadata"].get("resourceVersion")))
        except ApiError as e:
            if e.status == 409:
                return False  # another replica wrote first
            raise
        self._valid_until = start + self.duration * 2 / 3
        return True

    async def run(self) -> None:
        while True:
            try:
                ok = await self.try_acquire_or_renew()
            except Exception as e:  # noqa: BLE001 - an API hiccup: try again, stop leading when too late
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                ok = False
            self._set(ok or self.is_leader)
            await asyncio.sleep(self.renew_interval)

    async def release(self) -> None:
        """On a clean shutdown: let another replica take over at once."""
        if not self._leading:
            return
        self._leading = False
        try:
            lease = await self.client.get(API, "leases", self.namespace, self.name)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                body = self._body(int((lease.get("spec") or {}).get("leaseTransitions") or 0), None,
                                  lease["metadata"].get("resourceVersion"))
                body["spec"]["holderIdentity"] = ""
                body["spec"]["leaseDurationSeconds"] = 1
                await self.client.replace(API, "leases", self.namespace, self.name, body)
        except Exception as e:  # noqa: BLE001
            log.warning("releasing lease %s/%s: %s", self.namespace, self.name, e)
