"""Polling each group's engine for /v1/status: where, what to believe, and when to say it is gone.

* Where: ``http://<podIP>:<port>`` of rank 0. The ``muxtune.io/engine-endpoint`` annotation, which
  anyone who may edit pods can set, is honoured only under ``--dev-endpoint-annotation``.
* Who: every poll carries the operator's status token (``Authorization: Bearer``); the engine
  answers /v1/status to that token only (engine/observe/status_server.py).
* What: a report counts only when it verifies with the polled group's key (muxtune/facts/trust.py), is
  not older than the last one accepted from that group, and only for the group's current members
  (matching uid where the engine reports one); everything else is dropped with one log line.
* Reachability: after ``unreachable_after`` failed polls in a row a group is unreachable since its
  first failure; the tasks show ``EngineReachable=False`` until a poll succeeds again.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Mapping

import aiohttp

from muxtune.facts import trust
from muxtune.operator import status
from muxtune.operator.config import ANN_ENDPOINT, LABEL_COMPONENT, OperatorConfig
from muxtune.operator.podspec import pod_name

log = logging.getLogger("muxtune.operator")


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Reach:
    failures: int = 0
    since: str | None = None  # time of the first failure in the current run of failures
    error: str = ""
    last_signed: float = 0.0


class EnginePoller:
    def __init__(self, config: OperatorConfig, key_of: Callable[[dict], bytes]):
        self.config = config
        self.key_of = key_of
        self.reports: dict[str, dict] = {}  # task key -> engine entry (with _group)
        self.reach: dict[tuple[str, str], Reach] = {}
        self.requests = 0

    def endpoint_of(self, pod: dict, node_fake: Mapping[str, bool]) -> str | None:
        ann = (pod.get("annotations") or {}).get(ANN_ENDPOINT)
        if ann and self.config.dev_endpoint_annotation:
            return ann.rstrip("/")
        if not self.config.poll_pod_ip or pod.get("phase") != "Running" or not pod.get("podIP"):
            return None
        if node_fake.get(pod.get("nodeName") or "", False):
            return None  # kwok: the pod IP is fake, nothing listens there
        ip = pod["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        return f"http://{host}:{self.config.engine_metrics_port}"

    def unreachable(self, gk: tuple[str, str]) -> Reach | None:
        r = self.reach.get(gk)
        return r if r is not None and r.failures >= self.config.unreachable_after else None

    def forget(self, live_tasks: set[str], live_groups: set[tuple[str, str]]) -> None:
        for k in [k for k in self.reports if k not in live_tasks]:
            del self.reports[k]
        for g in [g for g in self.reach if g not in live_groups]:
            del self.reach[g]

    def forget_running(self, gk: tuple[str, str]) -> None:
        """The group's world was lost: what its engine said about unfinished tasks no longer holds."""
        for k in [k for k, e in self.reports.items() if e.get("_group") == gk[1] and e.get("phase") not in ("Succeeded", "Failed")]:
            del self.reports[k]
        self.reach.pop(gk, None)

    def _fail(self, gk, error: str) -> bool:
        r = self.reach.setdefault(gk, Reach())
        r.failures += 1
        r.since = r.since or utcnow()
        r.error = error
        if r.failures == self.config.unreachable_after:
            log.warning("engine of group %s/%s unreachable since %s: %s", gk[0], gk[1], r.since, error)
            return True
        return False

    def _accept(self, gk, group: dict, payload) -> tuple[bool, str]:
        """(changed, error): error when the report is not believed."""
        if not isinstance(payload, dict):
            return False, "no JSON report"
        try:
            body, signed_at = trust.verify_report(self.key_of(group), gk[1], payload)
        except trust.TrustError as e:
            return False, f"report refused: {e}"
        r = self.reach.setdefault(gk, Reach())
        if signed_at < r.last_signed:
            return False, "report refused: older than one already accepted (replay)"
        was_unreachable = r.failures >= self.config.unreachable_after
        r.failures, r.since, r.error, r.last_signed = 0, None, "", signed_at
        members = {f"{m['namespace']}/{m['name']}": m.get("uid") for m in (group.get("spec") or {}).get("tasks") or []}
        changed = was_unreachable
        for key, entry in (body.get("tasks") or {}).items():
            if key not in members or not isinstance(entry, dict):
                continue  # a task that is not this group's member: not the engine's to report
            if entry.get("uid") and members[key] and entry["uid"] != members[key]:
                continue
            if entry.get("phase") not in status.ENGINE_PHASES:
                continue
            entry = {**entry, "_group": gk[1]}
            if self.reports.get(key) != entry:
                self.reports[key] = entry
                changed = True
        return changed, ""

    async def poll(self, groups: Mapping[tuple[str, str], dict], pods: Mapping[tuple[str, str], dict],
                   node_fake: Mapping[str, bool]) -> bool:
        """Fetch /v1/status from rank 0 of every group; True when what the tasks should show changed."""
        targets = []
        for gk, g in groups.items():
            if g["metadata"].get("deletionTimestamp"):
                continue
            p = pods.get((gk[0], pod_name(gk[1], 0)))
            if p is None or p["deleting"] or (p.get("labels") or {}).get(LABEL_COMPONENT) != "engine":
                continue
            if p.get("phase") != "Running" and not (self.config.dev_endpoint_annotation and
                                                    (p.get("annotations") or {}).get(ANN_ENDPOINT)):
                continue  # nothing to reach yet: not a failure
            ep = self.endpoint_of(p, node_fake)
            if ep:
                targets.append((gk, g, ep))
        timeout = aiohttp.ClientTimeout(total=self.config.poll_timeout)
        auth = {"Authorization": f"Bearer {self.config.status_token}"} if self.config.status_token else {}
        async with aiohttp.ClientSession(timeout=timeout, headers=auth) as s:
            async def one(ep):
                self.requests += 1
                try:
                    async with s.get(f"{ep}/v1/status", allow_redirects=False) as r:
                        if r.status != 200:
                            return None, f"HTTP {r.status}"
                        return await r.json(content_type=None), ""
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    return None, f"{type(e).__name__}: {e}"[:300]
            results = await asyncio.gather(*(one(ep) for _, _, ep in targets))
        changed = False
        for (gk, g, ep), (payload, err) in zip(targets, results):
            if not err:
                ch, err = self._accept(gk, g, payload)
                changed |= ch
                if err:
                    log.warning("group %s/%s: %s", gk[0], gk[1], err)
            if err:
                changed |= self._fail(gk, err)
        return changed
