"""What one reconcile pass decides from: a snapshot of the world, and which tasks stay where. Pure.

The controller reads its indices (with its own recent writes laid over them) once per pass into a
:class:`Snapshot`; every later phase reads that, so a write of this pass never feeds a decision of
the same pass. :func:`membership` then says which tasks keep their group (a BackboneGroup's
spec.tasks is the source of truth), which are refused by policy, and which wait for the planner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from muxtune.operator import gang, policy, status
from muxtune.operator.config import LABEL_GROUP, LABEL_MANAGED_BY, MANAGED_BY
from muxtune.operator.planner import NodeInfo, PlannerConfig, TaskRequest
from muxtune.operator.world import task_request

GroupKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Snapshot:
    """The world as this pass sees it; tasks are keyed "namespace/name" (watched namespaces only),
    groups sorted by name, pods by the group they belong to."""

    now: str
    tasks: Mapping[str, dict]
    groups: Mapping[GroupKey, dict]
    pods_of: Mapping[GroupKey, list[dict]]
    configmaps: Mapping[GroupKey, dict]
    services: Mapping[GroupKey, dict]
    inventory: Sequence[NodeInfo]  # free GPUs per schedulable GPU node
    basemodels: Mapping[str, dict]  # by name
    architectures: Mapping[str, Any]  # BaseModel name -> Architecture, or None without figures
    namespace_labels: Mapping[str, Mapping[str, str]]
    reserved_names: frozenset[str]  # group names a new group must not take
    planner_config: PlannerConfig


@dataclass(frozen=True)
class Membership:
    """Who stays where: parsed tasks (a str: why the spec is invalid), policy refusals, and each
    group's members that stay in it."""

    parsed: Mapping[str, Any]
    refused: Mapping[str, policy.Refusal]
    member_of: Mapping[str, GroupKey]
    active: Mapping[GroupKey, list[str]]
    namespace_labels: Mapping[str, Mapping[str, str]]

    def request(self, key: str) -> TaskRequest:
        return task_request(self.parsed[key], self.namespace_labels.get(key.split("/", 1)[0]))

    def placeable(self, key: str, obj: dict) -> bool:
        return _placeable(self.parsed, self.refused, key, obj)


def _placeable(parsed: Mapping[str, Any], refused: Mapping[str, Any], key: str, obj: dict) -> bool:
    """Valid, not suspended, deleted, finished or refused: a task that belongs in a group."""
    p = parsed[key]
    return not (deleting(obj) or terminal(obj) or isinstance(p, str) or p.spec.suspend or key in refused)


def terminal(obj: dict) -> bool:
    return ((obj.get("status") or {}).get("phase")) in status.TERMINAL


def deleting(obj: dict) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def pods_by_group(pods: Mapping[Any, dict]) -> dict[GroupKey, list[dict]]:
    """Our engine pods, by the group their label names (other GPU pods only count as used GPUs)."""
    out: dict[GroupKey, list[dict]] = {}
    for p in pods.values():
        g = (p.get("labels") or {}).get(LABEL_GROUP)
        if g and (p.get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY:
            out.setdefault((p["namespace"], g), []).append(p)
    return out


def membership(snap: Snapshot, parsed: Mapping[str, Any]) -> Membership:
    """Members that were deleted, suspended, finished, refused, re-created under another uid, or
    listed twice (the first group by name keeps them) leave their group."""
    refused = _refusals(snap, parsed)
    member_of: dict[str, GroupKey] = {}
    active: dict[GroupKey, list[str]] = {}
    for gk, g in snap.groups.items():
        if deleting(g):
            continue
        keep = []
        for m in (g.get("spec") or {}).get("tasks") or []:
            k = f"{m['namespace']}/{m['name']}"
            o = snap.tasks.get(k)
            if o is None or (m.get("uid") and o["metadata"].get("uid") != m["uid"]):
                continue
            if not _placeable(parsed, refused, k, o) or k in member_of:
                continue
            member_of[k] = gk
            keep.append(k)
        active[gk] = keep
    return Membership(parsed, refused, member_of, active, snap.namespace_labels)


def _refusals(snap: Snapshot, parsed: Mapping[str, Any]) -> dict[str, policy.Refusal]:
    """Tasks the cluster's policy keeps out of every group (a BaseModel that does not admit them)."""
    refused = {}
    for k, p in parsed.items():
        if not isinstance(p, str):
            r = policy.refusal(task_request(p, snap.namespace_labels.get(p.metadata.namespace or "default")),
                               snap.basemodels, snap.namespace_labels, snap.planner_config)
            if r is not None:
                refused[k] = r
    return refused


def pending_requests(snap: Snapshot, ms: Membership) -> list[TaskRequest]:
    """Placeable tasks in no group, by key: the planner's input."""
    return [ms.request(k) for k, o in sorted(snap.tasks.items()) if k not in ms.member_of and ms.placeable(k, o)]


def dp_of(group: dict) -> int:
    return int(((group.get("spec") or {}).get("parallelism") or {}).get("dp", 1))


def unbound_pods(group: dict, pods: list[dict]) -> int:
    """Pods of the group no node has bound yet, counting the ones still to be created."""
    live = [p for p in pods if not p["deleting"] and p["phase"] not in ("Succeeded", "Failed")]
    return sum(1 for p in live if not p.get("nodeName")) + max(0, dp_of(group) - len(live))


def group_failed(group: dict, pods: list[dict], max_restarts: int) -> bool:
    """Lost pods restart the group, until the restart limit: then it takes no new members."""
    return gang.restarts_of(group)[0] >= max_restarts and gang.lost_pod(pods, dp_of(group), False) is not None
