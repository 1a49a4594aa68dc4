"""Gang semantics of a group's pods: pure decisions, no API calls (operator/groups.py acts on them).

A group of dp pods is one torch.distributed world (PET_NNODES = dp): it runs whole or not at all.

* Admission. With Kueue (the group has a queue) every pod is created at once and carries Kueue's
  plain-pod-group metadata, so Kueue gates them and admits the group as one Workload when its
  quota allows. Without Kueue the operator creates no pod of a group until all of them fit: free
  GPUs of the group's GPU class, from its node inventory, for every pod at once
  (:class:`Capacity`, shared by the groups waiting in one pass, highest priority first).
* Loss. A pod that failed or exited, was deleted while the others run, or vanished from a
  started group breaks the world: the whole group restarts (every pod deleted, with Kueue its
  Workload first, then all recreated) and the engine resumes every task from its checkpoints.
  Restarts are counted on the group (annotation) and delayed exponentially; after
  ``max_group_restarts`` the pods are left as they are and the tasks fail with the last reason.
* A partial gang that never started (a refused creation, an operator restart between two
  creates) is completed, not restarted.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Mapping

from muxtune.operator.config import ANN_RESTART_REASON, ANN_RESTARTED_AT, ANN_RESTARTS
from muxtune.operator.planner import NodeInfo

STEADY, CREATE, WAIT, RESTART, FAILED = "steady", "create", "wait", "restart", "failed"


@dataclass(frozen=True)
class Decision:
    action: str  # steady | create | wait | restart | failed
    ranks: tuple[int, ...] = ()  # pods to create
    reason: str = ""  # the tasks' Running condition reason while the group cannot run
    message: str = ""
    retry_in: float | None = None  # seconds until the decision may change by itself


def restarts_of(group: Mapping) -> tuple[int, float | None, str]:
    """(restarts so far, when the last began as epoch seconds, why)."""
    ann = (group.get("metadata") or {}).get("annotations") or {}
    try:
        n = int(ann.get(ANN_RESTARTS) or 0)
    except ValueError:
        n = 0
    at = None
    if ann.get(ANN_RESTARTED_AT):
        try:
            at = datetime.strptime(ann[ANN_RESTARTED_AT], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            at = None
    return n, at, ann.get(ANN_RESTART_REASON) or ""


def restart_annotations(restarts: int, reason: str, now: float) -> dict[str, str]:
    when = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {ANN_RESTARTS: str(restarts), ANN_RESTARTED_AT: when, ANN_RESTART_REASON: reason[:512]}


def lost_pod(pods: list[dict], dp: int, creation_refused: bool) -> str | None:
    """Why the group's world is broken, or None. ``pods``: the group's compact pods."""
    live = [p for p in pods if not p["deleting"]]
    for p in sorted(live, key=lambda p: p["name"]):
        if p["phase"] == "Failed":
            return f"pod {p['name']} failed: {p.get('message') or 'no reason given'}"
        if p["phase"] == "Succeeded":
            return f"pod {p['name']} exited"
    gone = sorted(p["name"] for p in pods if p["deleting"])
    if gone and live:
        return f"pod {gone[0]} was deleted"
    if 0 < len(live) < dp and not creation_refused and any(p.get("nodeName") for p in live):
        return f"{dp - len(live)} of the group's {dp} pods are gone"
    return None


def decide(pods: list[dict], names: list[str], group: Mapping, *, now: float, max_restarts: int,
           backoff_base: float, backoff_cap: float, creation_refused: bool, queued: bool, fits) -> Decision:
    """What to do with one group's pods this pass. ``names``: its pods' names by rank; ``fits()``
    -> (True, "") or (False, why): whether the inventory holds every pod now (not asked with Kueue)."""
    dp = len(names)
    restarts, restarted_at, last_reason = restarts_of(group)
    lost = lost_pod(pods, dp, creation_refused)
    if lost is not None:
        if restarts >= max_restarts:
            return Decision(FAILED, reason="PodFailed",
                            message=f"{lost}; the group was already restarted {restarts} time(s) (limit {max_restarts})")
        return Decision(RESTART, reason="GroupRestarting",
                        message=f"{lost}: restarting the whole group from its checkpoints (restart {restarts + 1})")
    if any(p["deleting"] for p in pods):
        if restarts:
            return Decision(WAIT, reason="GroupRestarting",
                            message=f"{last_reason}: waiting for the group's old pods to go (restart {restarts})")
        return Decision(WAIT, reason="PodPending", message="waiting for the group's old pods to go")
    have = {p["name"] for p in pods}
    missing = tuple(r for r, n in enumerate(names) if n not in have)
    if not missing:
        return Decision(STEADY)
    if len(missing) < dp:
        return Decision(CREATE, missing)  # complete a gang that never started
    if restarts and restarted_at is not None:
        wait = restarted_at + min(backoff_cap, backoff_base * 2 ** (restarts - 1)) - now
        if wait > 0:
            return Decision(WAIT, reason="GroupRestarting", retry_in=wait,
                            message=f"{last_reason}: recreating the group's {dp} pod(s) in {wait:.0f}s (restart {restarts})")
    if queued:
        return Decision(CREATE, missing)
    ok, why = fits()
    if not ok:
        return Decision(WAIT, reason="WaitingForGang", message=why)
    return Decision(CREATE, missing)


class Capacity:
    """Free GPUs per node for gang checks: the inventory less the GPUs of pods not yet bound
    (they will take some) and of gangs admitted earlier in the same pass."""

    def __init__(self, nodes: Iterable[NodeInfo]):
        self.nodes = {n.name: n for n in nodes}
        self.free = {n.name: max(0, n.gpus_free) for n in self.nodes.values()}

    def _eligible(self, product: str, min_memory_mib: int) -> list[str]:
        return sorted(n.name for n in self.nodes.values()
                      if (not product or n.gpu_product == product) and n.gpu_memory_mib >= min_memory_mib)

    def place(self, product: str, min_memory_mib: int, pods: int, gpus_per_pod: int) -> list[str] | None:
        """Nodes for ``pods`` pods (several may share a node), best fit; None when they do not all fit."""
        free = dict(self.free)
        where = []
        for _ in range(pods):
            cands = sorted((free[n], n) for n in self._eligible(product, min_memory_mib) if free[n] >= gpus_per_pod)
            if not cands:
                return None
            free[cands[0][1]] -= gpus_per_pod
            where.append(cands[0][1])
        return where

    def take(self, names: list[str], gpus_per_pod: int) -> None:
        for n in names:
            self.free[n] -= gpus_per_pod

    def reserve_unbound(self, product: str, min_memory_mib: int, gpus: int) -> None:
        where = self.place(product, min_memory_mib, 1, gpus)
        if where:
            self.take(where, gpus)

    def why_not(self, product: str, min_memory_mib: int, pods: int, gpus_per_pod: int) -> str:
        nodes = self._eligible(product, min_memory_mib)
        free = ", ".join(f"{n} {self.free[n]}" for n in nodes[:8]) + (", ..." if len(nodes) > 8 else "")
        what = f"{product} " if product else ""
        return (f"waiting until all {pods} pods ({gpus_per_pod} GPU(s) each) fit at once: free {what}GPUs per "
                f"schedulable node: {free or 'none'}")
