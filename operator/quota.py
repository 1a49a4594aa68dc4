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
* Kueue: a namespace's queue is its LocalQueue named ``default`` (Kueue's default-queue
  convention), else every LocalQueue it has (the tightest holds). Its ClusterQueue's room is the
  nominal ``nvidia.com/gpu`` quota over all flavors less what Kueue has reserved or admitted there;
  what counts against it is the charge of every namespace whose queue is that ClusterQueue (its
  other tasks' shares included), since Kueue never sees the operator's shared groups. Borrowing in
  a cohort is not counted: a shared task gets the nominal quota at most;
* a group on a time-sliced GPU (``nvidia.com/gpu.shared``, operator/placement.py) is charged too,
  even in its tenant's own namespace: its pod requests a replica, which no ``nvidia.com/gpu``
  quota counts, so the operator charges its share of the GPU (``gpu_fraction``) by token share;
* a task newly placed into a shared group (or onto a GPU slice) whose namespace's (or queue's) charge would exceed its
  room is not placed: it waits, ``QuotaExceeded``, naming the quota. Tasks already running are
  never evicted.

Why not a placeholder object in the tenant's namespace (a quota-counted Pod or claim that the API
server would refuse): a placeholder Pod requesting GPUs would hold real GPUs on a node (or never
schedule, keeping quota but no meaning), and no other namespaced object counts toward
``requests.nvidia.com/gpu``. Checking the quota objects before placement keeps one source of
truth (the tenant's ResourceQuota, which platform teams already manage) and says why in the task.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from muxtune.operator.config import KUEUE_API
from muxtune.operator.kube import ApiError
from muxtune.operator.placement import GroupPlan, TaskRequest, Unplaceable
from muxtune.operator.world import parse_quantity_int

GPU_QUOTA_KEYS = ("requests.nvidia.com/gpu", "nvidia.com/gpu")
GPU = "nvidia.com/gpu"
KUEUE_ABSENT = (403, 404)  # Kueue not installed, or the chart's rights on its queues not granted


@dataclass(frozen=True)
class Room:
    """Free GPU quota, the object that sets it (``quota``: a ResourceQuota's name, or
    ``ClusterQueue <name>``) and the namespaces whose shared tasks count against it (``scope``;
    empty: only the namespace it was read for)."""

    free: float
    quota: str
    hard: float
    scope: frozenset[str] = frozenset()

    def label(self) -> str:
        return self.quota if self.quota.startswith("ClusterQueue ") else f"ResourceQuota {self.quota}"


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


def charged_by_operator(g: GroupPlan) -> bool:
    """Groups no namespace's ResourceQuota counts: shared ones (the operator's namespace) and those
    on a GPU slice (a ``nvidia.com/gpu.shared`` replica is not a ``nvidia.com/gpu``)."""
    return g.tenancy is None or g.shared_gpu


def group_gpus(g: GroupPlan) -> float:
    return g.gpus * g.gpu_fraction if g.shared_gpu else g.gpus


def charges(groups: Iterable[GroupPlan], requests: Mapping[str, TaskRequest]) -> dict[str, float]:
    """{namespace: GPUs charged} over the groups the operator charges, by token share."""
    out: dict[str, float] = {}
    for g in groups:
        if not charged_by_operator(g) or not g.members:
            continue
        total = sum(tokens(requests[k]) for k in g.members)
        for k in g.members:
            ns = requests[k].namespace
            out[ns] = out.get(ns, 0.0) + group_gpus(g) * tokens(requests[k]) / total
    return out


def _what(g: GroupPlan) -> str:
    where = "shared group" if g.tenancy is None else "group"
    return f"{where} {g.name}" + (f" (a {g.gpu_fraction:g} slice of a time-sliced GPU)" if g.shared_gpu else "")


def _limits(room_or_rooms) -> list[Room]:
    if room_or_rooms is None:
        return []
    return [room_or_rooms] if isinstance(room_or_rooms, Room) else list(room_or_rooms)


def over_quota(groups: Iterable[GroupPlan], requests: Mapping[str, TaskRequest], new: set[str],
               rooms: Mapping[str, Room | Iterable[Room] | None]) -> list[Unplaceable]:
    """The newly placed shared-group tasks (keys in ``new``) whose namespace's charge (or, for a
    ClusterQueue, the charge of every namespace in its scope) exceeds a room of theirs."""
    groups = list(groups)
    charged = charges(groups, requests)
    out = []
    for g in groups:
        if not charged_by_operator(g):
            continue
        for k in g.members:
            ns = requests[k].namespace
            if k not in new:
                continue
            for r in _limits(rooms.get(ns)):
                scope = r.scope or {ns}
                charge = sum(charged.get(n, 0.0) for n in scope)
                if charge > r.free + 1e-9:
                    whose = f"namespace {ns}'s" if scope == {ns} else f"the queue of namespace {ns} ({', '.join(sorted(scope))})"
                    out.append(Unplaceable(k, "QuotaExceeded", (
                        f"{whose} GPU quota ({r.label()}: {r.hard:g} GPU(s), {max(r.free, 0):g} free) does not "
                        f"cover its share of {_what(g)} ({charge:.2f} GPU(s) by token share over all "
                        f"its tasks there); the task waits until quota frees or is raised")))
                    break
    return out


def cluster_queue_room(cq: dict) -> Room | None:
    """A ClusterQueue's free nominal GPU quota (all flavors); None when it does not cover GPUs."""
    nominal, covered = 0.0, False
    for rg in (cq.get("spec") or {}).get("resourceGroups") or []:
        for fl in rg.get("flavors") or []:
            for r in fl.get("resources") or []:
                if r.get("name") == GPU:
                    covered = True
                    nominal += parse_quantity_int(r.get("nominalQuota", "0"))
    if not covered:
        return None
    st = cq.get("status") or {}
    used = max((sum(parse_quantity_int(r.get("total", "0")) for f in st.get(field) or [] for r in f.get("resources") or []
                    if r.get("name") == GPU) for field in ("flavorsReservation", "flavorsUsage")), default=0)
    return Room(nominal - used, f"ClusterQueue {cq['metadata']['name']}", nominal)


def queues_of(local_queues: Iterable[dict]) -> list[str]:
    """The ClusterQueues a namespace's shared tasks count against: its LocalQueue ``default``'s,
    else every one its LocalQueues point to."""
    lqs = list(local_queues)
    chosen = [q for q in lqs if q["metadata"]["name"] == "default"] or lqs
    return sorted({(q.get("spec") or {}).get("clusterQueue") for q in chosen} - {None, ""})


async def _kueue_list(client, plural: str, namespace: str | None = None) -> list[dict]:
    try:
        return (await client.list(KUEUE_API, plural, namespace)).get("items") or []
    except ApiError as e:
        if e.status in KUEUE_ABSENT:
            return []
        raise


async def kueue_rooms(client, namespaces: Iterable[str]) -> dict[str, list[Room]]:
    """{namespace: its ClusterQueues' rooms}, each scoped to every namespace here sharing it."""
    cqs_of = {ns: queues_of(await _kueue_list(client, "localqueues", ns)) for ns in sorted(set(namespaces))}
    if not any(cqs_of.values()):
        return {}
    cqs = {cq["metadata"]["name"]: cq for cq in await _kueue_list(client, "clusterqueues")}
    out: dict[str, list[Room]] = {}
    for ns, names in cqs_of.items():
        for name in names:
            r = cluster_queue_room(cqs[name]) if name in cqs else None
            if r is not None:
                scope = frozenset(n for n, qs in cqs_of.items() if name in qs)
                out.setdefault(ns, []).append(Room(r.free, r.quota, r.hard, scope))
    return out


async def place_within_quota(client, plan, pending: list[TaskRequest], members: Mapping[str, TaskRequest], replan):
    """(plan, waiting): re-plans without the new shared tasks their namespaces' quotas cannot cover,
    until none is over (``replan(pending)`` plans again; ``members``: the tasks already in groups).
    The quotas are read only for namespaces with a task newly placed in a shared group."""
    requests = {**members, **{t.key: t for t in pending}}
    new = {t.key for t in pending}
    placed = {requests[k].namespace for g in plan.groups if charged_by_operator(g) for k in g.members if k in new}
    if not placed:
        return plan, []
    charged = {requests[k].namespace for g in plan.groups if charged_by_operator(g) for k in g.members}
    queues = await kueue_rooms(client, charged)
    rooms = {ns: [*_limits(room((await client.list("v1", "resourcequotas", ns)).get("items") or [])), *queues.get(ns, [])]
             for ns in sorted(placed)}
    waiting: dict[str, Unplaceable] = {}
    for _ in range(4):  # removing a task raises its group-mates' shares: check again
        over = [u for u in over_quota(plan.groups, requests, new - set(waiting), rooms) if u.task not in waiting]
        if not over:
            break
        waiting.update({u.task: u for u in over})
        plan = replan([t for t in pending if t.key not in waiting])
    return plan, list(waiting.values())
