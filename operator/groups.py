"""Applying one planned BackboneGroup: the group object, its signed ConfigMap, Service, key Secret,
PodDisruptionBudget and Pods, and tearing down a group left without members.

Pod creation that the API server refuses (a ResourceQuota, Pod Security admission, a missing
PriorityClass, ...) is not retried at the reconcile rate: each group backs off exponentially
(``pod_backoff_base`` doubling up to ``pod_backoff_cap``), every attempt logs one line, the
member tasks get the API server's message in their Running condition, and a Warning Event is
posted on each member task.

The group's pods are a gang (operator/gang.py): created together once they all fit (or, with
Kueue, all at once for Kueue to admit together), and restarted together when one is lost: with
Kueue its Workload is deleted first (operator/kueue.py), then every pod.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from muxtune.api.meta import GROUP, VERSION
from muxtune.operator.config import ANN_ENGINE_BUDGET, ANN_QUEUE, OperatorConfig
from muxtune.operator import gang, isolation, kueue, podspec, resources
from muxtune.operator.events import EventSink
from muxtune.operator.keys import GroupKeys
from muxtune.operator.kube import ApiError, KubeClient
from muxtune.operator.overlay import Overlay
from muxtune.operator.planner import GroupPlan
from muxtune.operator.poller import EnginePoller
from muxtune.operator.snapshot import GroupKey
from muxtune.operator.world import compact_pod

log = logging.getLogger("muxtune.operator")
API = f"{GROUP}/{VERSION}"
REFUSED = (400, 403, 404, 422)  # admission, quota, validation, a missing namespace object


@dataclass
class Refused:
    attempts: int
    next_at: float  # time.monotonic()
    message: str


class PodBackoff:
    """Per-group exponential backoff of refused pod creations."""

    def __init__(self, base: float, cap: float):
        self.base, self.cap = base, cap
        self.state: dict[tuple[str, str], Refused] = {}

    def ready(self, gk) -> bool:
        r = self.state.get(gk)
        return r is None or time.monotonic() >= r.next_at

    def failed(self, gk, message: str) -> Refused:
        prev = self.state.get(gk)
        n = (prev.attempts if prev else 0) + 1
        delay = min(self.cap, self.base * (2 ** (n - 1)))
        self.state[gk] = r = Refused(n, time.monotonic() + delay, message)
        return r

    def succeeded(self, gk) -> None:
        self.state.pop(gk, None)

    def refused(self, gk) -> Refused | None:
        return self.state.get(gk)


class GroupApplier:
    """Writes one planned group and its children, for the controller that holds it.

    ``backoff``, ``decisions`` (this pass's gang decision per group) and ``workload_msgs`` (why
    Kueue holds a group back) are shared with the controller, which reads them for the tasks'
    status; ``overlay`` remembers every write until the watch shows it; ``kick`` asks for another
    pass (after a backoff or a wait).
    """

    def __init__(self, *, client: KubeClient, config: OperatorConfig, keys: GroupKeys, events: EventSink,
                 overlay: Overlay, backoff: PodBackoff, poller: EnginePoller, kick: Callable[[], None],
                 decisions: dict[GroupKey, gang.Decision], workload_msgs: dict[GroupKey, str]):
        self.client, self.config, self.keys, self.events, self.overlay = client, config, keys, events, overlay
        self.backoff, self.poller, self.kick = backoff, poller, kick
        self.decisions, self.workload_msgs = decisions, workload_msgs
        self._sa_ready: set[tuple[str, str]] = set()

    async def apply(self, gk: GroupKey, gp: GroupPlan, gobj: dict | None, members: list[dict], parsed_members: list,
                    gpods: list[dict], cm: dict | None, svc: dict | None, bms: Mapping[str, dict],
                    fits: tuple[bool, str] = (True, "")) -> bool:
        """Bring one group to its plan (``fits``: whether all its pods fit now); a group left
        without members is torn down. False: a terminating namesake holds the name, retry later."""
        if not gp.members:
            if gobj is not None and not gobj["metadata"].get("deletionTimestamp"):
                await self._delete_group(gobj, gpods, cm, svc)
            return True
        gobj = await self._ensure_group(gk, gp, gobj, members, parsed_members)
        if gobj is None:
            return False  # a terminating namesake: retry after it is gone (then the name is free)
        bm = bms.get(gp.base_model.split(":", 1)[1]) if gp.base_model.startswith("model:") else None
        await self._ensure_configmap(gk, gobj, parsed_members, cm, bm)
        if svc is None:
            svc, _ = await self.client.create_or_adopt("v1", "services", gk[0],
                                                       resources.service_manifest(gobj, self.config))
            self.overlay.note("services", svc)
        gobj = await self._run_gang(gk, gp, gobj, gpods, members, parsed_members, bm, fits)
        await self._group_status(gk, gp, gobj, gpods)
        return True

    async def _ensure_group(self, gk, gp, gobj, members, parsed_members) -> dict | None:
        """The group object with the planned spec; None while a terminating namesake has the name."""
        ns, name = gk
        desired = resources.group_manifest(gp, members)
        if gobj is None:
            gobj, created = await self.client.create_or_adopt(API, "backbonegroups", ns, desired)
            if not created and gobj["metadata"].get("deletionTimestamp"):
                return None
            self.overlay.note("backbonegroups", gobj)
            if created:
                log.info("group %s/%s created: %s", ns, name, ", ".join(gp.members))
                await self.events.post(gobj, "Normal", "Created",
                                       f"{len(gp.members)} task(s), {gp.gpus} GPU(s) dp={gp.parallelism.dp} "
                                       f"tp={gp.parallelism.tp} pp={gp.parallelism.pp}")
        if not subset(desired["spec"], gobj.get("spec") or {}):
            gobj = await self.client.patch(API, "backbonegroups", ns, name, {"spec": desired["spec"]})
            self.overlay.note("backbonegroups", gobj)
        return gobj

    async def _ensure_configmap(self, gk, gobj, parsed_members, cm, bm) -> None:
        """The member tasks as the engine reads them, signed with this group's key."""
        ns = gk[0]
        key = self.keys.key(gobj)
        text = resources.tasks_yaml(parsed_members, bm)
        if resources.configmap_current(gobj, cm, text, key):
            return
        want_cm = resources.configmap_manifest(gobj, parsed_members, key,
                                               resources.next_revision(cm, int(time.time() * 1000)), bm)
        created = False
        if cm is None:
            cm, created = await self.client.create_or_adopt("v1", "configmaps", ns, want_cm)
            self.overlay.note("configmaps", cm)
        if not created and not resources.configmap_current(gobj, cm, text, key):
            tampered = resources.configmap_tampered(gobj, cm, key)
            cm = await self.client.patch("v1", "configmaps", ns, want_cm["metadata"]["name"], {"data": want_cm["data"]})
            self.overlay.note("configmaps", cm)
            if tampered:  # someone else edited it: say that it was put back, and why it was noticed
                log.warning("group %s/%s: ConfigMap %s restored: %s", ns, gk[1], cm["metadata"]["name"], tampered)
                await self.events.post(dict(cm, apiVersion="v1", kind="ConfigMap"), "Warning", "Restored",
                                       f"edited outside the operator ({tampered}); restored the signed task list")

    async def _run_gang(self, gk, gp, gobj, gpods, members, parsed_members, bm, fits) -> dict:
        """Create, keep or restart the group's pods as one gang (operator/gang.py decides)."""
        ns, name = gk
        cfg = self.config
        stale = [p for p in gpods if not p["deleting"] and podspec.runs_other_budget(p, gobj.get("spec") or {})]
        if stale:  # the planner lowered the budget before the first step: nothing to lose but start-up
            await self._delete_pods(gpods)
            self.decisions[gk] = gang.Decision(gang.WAIT, reason="PodPending", message=(
                f"restarting the group's pods with token budget {podspec.engine_budget(gobj['spec'])} "
                f"(was {stale[0]['annotations'].get(ANN_ENGINE_BUDGET)}) to take in more tasks"))
            log.info("group %s/%s: %s", ns, name, self.decisions[gk].message)
            return gobj
        names = [resources.pod_name(name, r) for r in range(gp.parallelism.dp)]
        decision = gang.decide(gpods, names, gobj, now=time.time(), max_restarts=cfg.max_group_restarts,
                               backoff_base=cfg.pod_backoff_base, backoff_cap=cfg.pod_backoff_cap,
                               creation_refused=self.backoff.refused(gk) is not None, queued=bool(gp.queue),
                               fits=lambda: fits)
        self.decisions[gk] = decision
        if decision.action == gang.RESTART:
            gobj = await self._restart_group(gk, gobj, gpods, decision.message, bool(gp.queue), members)
        elif decision.action == gang.CREATE:
            if len(decision.ranks) == len(names) and gp.queue and not await kueue.gone(self.client, ns, name):
                self.decisions[gk] = gang.Decision(gang.WAIT, reason="GroupRestarting",
                                                   message="waiting for Kueue to delete the group's previous Workload")
                asyncio.get_running_loop().call_later(1.0, self.kick)
            else:
                priority = max((p.spec.priority for p in parsed_members), default=0)
                await self._create_pods(gk, gobj, list(decision.ranks), bm, priority, members)
        else:
            if decision.action == gang.STEADY:
                self.backoff.succeeded(gk)
            if decision.retry_in is not None:
                asyncio.get_running_loop().call_later(decision.retry_in + 0.05, self.kick)
        return gobj

    async def _ensure_service_account(self, ns: str) -> None:
        name = self.config.engine_service_account
        if (ns, name) in self._sa_ready:
            return
        await self._create_once("v1", "serviceaccounts", ns, resources.engine_service_account_manifest(ns, name))
        self._sa_ready.add((ns, name))

    async def _ensure_isolation(self, gobj: dict) -> None:
        """Every group's NetworkPolicy; for a serving group, each member namespace's serving token
        (in that namespace) and their digests for the engine (operator/isolation.py)."""
        ns = gobj["metadata"]["namespace"]
        members = podspec.group_namespaces(gobj)
        policy = isolation.network_policy_manifest(gobj, self.config, members)
        try:
            await self.client.create("networking.k8s.io/v1", "networkpolicies", ns, policy)
        except ApiError as e:
            if e.status != 409:
                raise
            await self.client.patch("networking.k8s.io/v1", "networkpolicies", ns, policy["metadata"]["name"],
                                    {"spec": policy["spec"]})  # one made by an older operator: bring it up to date
        if not (gobj.get("spec") or {}).get("serving"):
            return
        tokens = {m: self.keys.serving_token(m) for m in members}
        for m, token in tokens.items():
            await self._create_once("v1", "secrets", m, isolation.tenant_token_secret_manifest(m, token))
        await self._create_once("v1", "secrets", ns, isolation.serving_tokens_secret_manifest(gobj, tokens))

    async def _create_once(self, api_version: str, plural: str, ns: str, body: dict) -> None:
        """Create; an existing object (409) is left as it is (the operator never reads Secrets back)."""
        try:
            await self.client.create(api_version, plural, ns, body)
        except ApiError as e:
            if e.status != 409:
                raise

    async def _create_pods(self, gk, gobj, missing: list[int], bm, priority: int, member_objs: list[dict]) -> None:
        ns, name = gk
        if not self.backoff.ready(gk):
            return
        try:
            await self._ensure_service_account(ns)
            await self._create_once("v1", "secrets", ns, resources.key_secret_manifest(gobj, self.keys.key(gobj)))
            if self.config.engine_pdb:
                await self._create_once("policy/v1", "poddisruptionbudgets", ns, resources.pdb_manifest(gobj))
            await self._ensure_isolation(gobj)
            for rank in missing:
                pod, _ = await self.client.create_or_adopt(
                    "v1", "pods", ns, resources.pod_manifest(gobj, rank, self.config, bm, priority))
                self.overlay.note("pods", compact_pod(pod))
        except ApiError as e:
            if e.status not in REFUSED:
                raise
            await self._creation_refused(gk, e, member_objs)
            return
        self.backoff.succeeded(gk)

    async def _creation_refused(self, gk, e: ApiError, member_objs: list[dict]) -> None:
        """Back off, log one line, and tell each member task why (a Warning Event)."""
        ns, name = gk
        r = self.backoff.failed(gk, e.message or str(e))
        delay = max(0.0, r.next_at - time.monotonic())
        log.warning("group %s/%s: pod creation refused (attempt %d; next in %.0fs): %s",
                    ns, name, r.attempts, delay, r.message)
        asyncio.get_running_loop().call_later(delay + 0.05, self.kick)
        for t in member_objs:
            await self.events.post(t, "Warning", "PodCreationRefused", f"BackboneGroup {name}: {r.message}")

    async def _restart_group(self, gk, gobj, gpods, reason: str, queued: bool, member_objs: list[dict]) -> dict:
        """A lost pod broke the group's world: every pod goes (the Workload first), to be recreated."""
        ns, name = gk
        restarts = gang.restarts_of(gobj)[0] + 1
        log.warning("group %s/%s: %s", ns, name, reason)
        gobj = await self.client.patch(API, "backbonegroups", ns, name, {"metadata": {
            "annotations": gang.restart_annotations(restarts, reason, time.time())}})
        self.overlay.note("backbonegroups", gobj)
        if queued:
            await kueue.delete_workload(self.client, ns, name)
        await self._delete_pods(gpods)
        self.poller.forget_running(gk)
        for t in member_objs:
            await self.events.post(t, "Warning", "GroupRestarting", f"BackboneGroup {name}: {reason}")
        return gobj

    async def _delete_pods(self, gpods) -> None:
        for p in gpods:
            if not p["deleting"]:
                await self.client.delete("v1", "pods", p["namespace"], p["name"])
                # seen as terminating until the watch shows it gone: its name is not free yet
                self.overlay.note("pods", {**p, "deleting": True, "metadata": {**p["metadata"], "resourceVersion": str(
                    int(p["metadata"].get("resourceVersion") or 0) + 1)}})

    def _readiness(self, gk, dp: int, pod_list: list[dict], ready: int) -> tuple[str, str, str]:
        """(phase, reason, message) of the group: its gang state first, then its pods."""
        decision = self.decisions.get(gk) or gang.Decision(gang.STEADY)
        refused = self.backoff.refused(gk)
        if decision.action == gang.FAILED:
            return "Failed", "PodFailed", decision.message
        if decision.action in (gang.RESTART, gang.WAIT) and decision.reason == "GroupRestarting":
            return "Degraded", "GroupRestarting", decision.message
        if decision.action == gang.WAIT:
            return "Pending", decision.reason, decision.message
        if refused:
            return "Pending", "PodCreationRefused", f"pod creation refused: {refused.message}"
        if any(p.get("gated") for p in pod_list):
            return "Pending", "WaitingForAdmission", self.workload_msgs.get(gk) or kueue.waiting_message(None)
        if len(pod_list) >= dp and all(p["phase"] == "Running" for p in pod_list):
            return "Running", "PodsRunning", f"{ready}/{dp} pod(s) ready"
        return "Pending", "PodsPending", f"{ready}/{dp} pod(s) ready"

    async def _group_status(self, gk, gp, gobj, gpods) -> None:
        ns, name = gk
        dp = gp.parallelism.dp
        pod_list = sorted([p for p in gpods if not p["deleting"]], key=lambda p: p["name"])
        ready = sum(1 for p in pod_list if p.get("ready"))
        phase, reason, msg = self._readiness(gk, dp, pod_list, ready)
        want_status = {
            "phase": phase,
            "pods": [resources.pod_name(name, r) for r in range(dp)],
            "readyPods": ready,
            "podsReady": f"{ready}/{dp}",
            "layout": f"dp{dp} x tp{gp.parallelism.tp} x pp{gp.parallelism.pp}",
            "restarts": gang.restarts_of(gobj)[0],
            "taskCount": len(gp.members),
            "gpus": gp.gpus,
            "memoryPlannedBytes": gp.memory_per_gpu_bytes * gp.gpus,
            "tokenBudget": gp.token_budget,
            "recompute": gp.recompute,
            "gpuMemoryFraction": round(gp.gpu_fraction, 6) if gp.shared_gpu else None,
            "observedGeneration": gobj["metadata"].get("generation"),
        }
        cur = gobj.get("status") or {}
        old_cond = next((c for c in cur.get("conditions") or [] if c.get("type") == "Ready"), None)
        if any(cur.get(k) != v for k, v in want_status.items()) or (old_cond or {}).get("message") != msg \
                or (old_cond or {}).get("reason") != reason:
            cond = {"type": "Ready", "status": "True" if phase == "Running" else "False", "reason": reason,
                    "message": msg[:1024], "lastTransitionTime": _utcnow()}
            if old_cond and old_cond.get("status") == cond["status"]:
                cond["lastTransitionTime"] = old_cond.get("lastTransitionTime") or cond["lastTransitionTime"]
            want_status["conditions"] = [cond]
            gobj = await self.client.patch(API, "backbonegroups", ns, name, {"status": want_status}, subresource="status")
            self.overlay.note("backbonegroups", gobj)

    async def _delete_group(self, gobj, gpods, cm, svc) -> None:
        ns, name = gobj["metadata"]["namespace"], gobj["metadata"]["name"]
        log.info("group %s/%s has no active members: tearing it down", ns, name)
        if (gobj["metadata"].get("annotations") or {}).get(ANN_QUEUE):
            await kueue.delete_workload(self.client, ns, name)  # else Kueue's finalizer keeps the pods
        await self._delete_pods(gpods)
        if cm is not None:
            await self.client.delete("v1", "configmaps", ns, cm["metadata"]["name"])
            self.overlay.note("configmaps", None, (ns, cm["metadata"]["name"]))
        if svc is not None:
            await self.client.delete("v1", "services", ns, name)
            self.overlay.note("services", None, (ns, name))
        await self.client.delete(API, "backbonegroups", ns, name)  # the key Secret and PDB go with it (owner)
        self.overlay.note("backbonegroups", None, (ns, name))
        self.backoff.succeeded((ns, name))
        await self.events.post(gobj, "Normal", "Deleted", "no active member tasks left; GPUs released")


def _utcnow() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def subset(want, have) -> bool:
    """Every field we set has our value (the API server may add defaults around it)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(subset(a, b) for a, b in zip(want, have))
    return want == have
