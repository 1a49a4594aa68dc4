"""GPU quotas hold whether or not a task shares: a shared group's GPUs are charged to its members'
namespaces, by their share.

A group of one namespace runs its pods in that namespace, so the API server's ResourceQuota
already counts them (a pod over quota is refused; the task says PodCreationRefused). A shared
group runs in the operator's namespace, where no tenant quota counts it; the operator charges it
instead, before placement:

* a member's share of its group is its token share, ``batch_size * max_seq_len`` over the
  group's sum: the fused tokens each task puts through the backbone per step, which is what the
  engine divides the GPUs' time by (TokenBudget); a namespace's charge is the sum of its tasks'
  shares of every shared group's GPUs (fractions of a GPU included);
* a namespace's room is, over its ResourceQuotas, the smallest ``hard - used`` of
  ``requests.nvidia.com/gpu`` (or ``nvidia.com/gpu``); ``used`` is what its own pods hold;
* a task newly placed into a shared group whose namespace's charge would exceed its room is not
  placed: it waits, ``QuotaExceeded``, naming the quota. Tasks already running are never evicted.

Why not a placeholder object in the tenant's namespace (a quota-counted Pod or claim that the API
server would refuse): a placeholder Pod requesting GPUs would hold real GPUs on a node (or never
schedule, keeping quota but no meaning), and no other namespaced object counts toward
``requests.nvidia.com/gpu``. Checking the quota objects before placement keeps one source of
truth (the tenant's ResourceQuota, which platform teams already manage) and says why in the task.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from muxtune.operator.placement import GroupPlan, TaskRequest, Unplaceable
from muxtune.operator.world import parse_quantity_int

GPU_QUOTA_KEYS = ("requests.nvidia.com/gpu", "nvidia.com/gpu")


@dataclass(frozen=True)
class Room:
    """A namespace's free GPU quota and the ResourceQuota that sets it."""

    free: float
    quota: str
    hard: float


def room(quotas: Iterable[dict]) -> Room | None:
    """The tightest GPU room over a namespace's ResourceQuotas; None when none limits GPUs."""
    best: Room | None = None
    for q in quotas:
        hard, used = (q.get("status") or {}).get("hard") or (q.get("spec") or {}).get("hard") or {}, \
            (q.get("status") or {}).get("used") or {}
        for key in GPU_QUOTA_KEYS:
            if key in hard:
                h = parse_quantity_int(hard[key])
                r = Room(h - parse_quantity_int(used.get(key, "0")), q["metadata"]["name"], h)
                if best is None or r.free < best.free:
                    best = r
    return best


def tokens(t: TaskRequest) -> int:
    return max(1, t.shape.batch_size * t.shape.max_seq_len)


def charges(groups: Iterable[GroupPlan], requests: Mapping[str, TaskRequest]) -> dict[str, float]:
    """{namespace: GPUs charged} over the shared groups (tenancy None), by token share."""
    out: dict[str, float] = {}
    for g in groups:
        if g.tenancy is not None or not g.members:
            continue
        total = sum(tokens(requests[k]) for k in g.members)
        for k in g.members:
            ns = requests[k].namespace
            out[ns] = out.get(ns, 0.0) + g.gpus * tokens(requests[k]) / total
    return out


def over_quota(groups: Iterable[GroupPlan], requests: Mapping[str, TaskRequest], new: set[str],
               rooms: Mapping[str, Room | None]) -> list[Unplaceable]:
    """The newly placed shared-group tasks (keys in ``new``) whose namespace's charge exceeds its room."""
    groups = list(groups)
    charged = charges(groups, requests)
    out = []
    for g in groups:
        if g.tenancy is not None:
            continue
        for k in g.members:
            ns = requests[k].namespace
            r = rooms.get(ns)
            if k in new and r is not None and charged.get(ns, 0.0) > r.free + 1e-9:
                out.append(Unplaceable(k, "QuotaExceeded", (
                    f"namespace {ns}'s GPU quota (ResourceQuota {r.quota}: {r.hard:g} GPU(s), {max(r.free, 0):g} free) "
                    f"does not cover its share of shared group {g.name} ({charged[ns]:.2f} GPU(s) by token share "
                    f"over all its shared tasks); the task waits until quota frees or is raised")))
    return out


async def place_within_quota(client, plan, pending: list[TaskRequest], members: Mapping[str, TaskRequest], replan):
    """(plan, waiting): re-plans without the new shared tasks their namespaces' quotas cannot cover,
    until none is over (``replan(pending)`` plans again; ``members``: the tasks already in groups).
    The quotas are read only for namespaces with a task newly placed in a shared group."""
    requests = {**members, **{t.key: t for t in pending}}
    new = {t.key for t in pending}
    placed = {requests[k].namespace for g in plan.groups if g.tenancy is None for k in g.members if k in new}
    if not placed:
        return plan, []
    rooms = {ns: room((await client.list("v1", "resourcequotas", ns)).get("items") or []) for ns in sorted(placed)}
    waiting: dict[str, Unplaceable] = {}
    for _ in range(4):  # removing a task raises its group-mates' shares: check again
        over = [u for u in over_quota(plan.groups, requests, new - set(waiting), rooms) if u.task not in waiting]
        if not over:
            break
        waiting.update({u.task: u for u in over})
        plan = replan([t for t in pending if t.key not in waiting])
    return plan, list(waiting.values())
