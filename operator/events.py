"""Kubernetes Events about the operator's objects: best effort, a failure only logs a warning."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from muxtune.api.meta import GROUP, VERSION
from muxtune.operator.config import MANAGED_BY
from muxtune.operator.kube import KubeClient

log = logging.getLogger("muxtune.operator")
API = f"{GROUP}/{VERSION}"


class EventSink:
    def __init__(self, client: KubeClient, instance: str):
        self.client = client
        self.instance = instance  # reportingInstance: which replica said it

    async def post(self, obj: dict, type_: str, reason: str, message: str) -> None:
        m = obj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{m['name']}.", "namespace": m.get("namespace") or "default"},
            "involvedObject": {"apiVersion": obj.get("apiVersion", API), "kind": obj.get("kind", "FineTuneTask"),
                               "name": m["name"], "namespace": m.get("namespace"), "uid": m.get("uid")},
            "reason": reason,
            "message": (message or reason)[:1024],
            "type": type_,
            "source": {"component": MANAGED_BY},
            "reportingComponent": f"muxtune.io/{MANAGED_BY}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        try:
            await self.client.create("v1", "events", m.get("namespace") or "default", body)
        except Exception as e:  # noqa: BLE001 - events are best effort
            log.warning("posting event %s for %s failed: %s", reason, m["name"], e)
