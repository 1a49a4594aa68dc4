"""Fair share between namespaces, and priority preemption, around the placement planner.

When every pending task fits, nothing changes: the planner places them all. When GPUs are short
(a trial plan leaves tasks WaitingForGpus), first come, first served would let one namespace's
burst take every GPU; instead the GPUs the plan uses are divided between the namespaces that want
them by weighted max-min fairness over GPUs, not tasks (a namespace of 2-GPU tasks gets as many
GPUs as one of 1-GPU tasks, so half as many tasks): progressive filling, where the namespace with
the fewest GPUs per unit of weight (its running tasks included) admits its next task, highest
priority first, while the task's GPUs still fit. A task's GPUs are its group's GPUs by token
share (``batch_size * max_seq_len``, as operator/quota.py charges them); a task the trial plan
did not place counts as a like task it did place (same backbone and shape), else as one GPU.
A namespace's weight comes from the operator's configuration.

A pending task that still cannot be placed preempts the running tasks of one group whose members
all have a lower priority (the lowest such group, from the namespace most over its share): they
leave their group, the engine checkpoints them at a cut (the --watch removal, or SIGTERM when the
group's pod goes), and they are Pending again, to resume from that checkpoint when GPUs are free.
One group is released at a time, and none while an earlier release is still under way.

Pure: no Kubernetes and no torch; the controller passes in a function that runs the planner.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from muxtune.operator.placement import GroupState, Plan, TaskRequest, Unplaceable
from muxtune.operator.quota import tokens

SHORT = "WaitingForGpus"  # the planner's reason when a task fits a GPU class but no GPU is free
HELD = "WaitingForFairShare"
PREEMPTED = "Preempted"

# (pending tasks, member keys to drop from their groups) -> the planner's plan
RunPlanner = Callable[[Sequence[TaskRequest], frozenset], Plan]


@dataclass(frozen=True)
class Weights:
    """Namespace -> weight of its share (default 1); a weight of 2 gets twice the share of 1."""

    by_namespace: Mapping[str, float] = field(default_factory=dict)
    default: float = 1.0

    def of(self, namespace: str) -> float:
        return max(1e-9, float(self.by_namespace.get(namespace, self.default)))


def fair_shares(capacity: float, demand: Mapping[str, float], weights: Weights) -> dict[str, float]:
    """Weighted max-min fair division of ``capacity`` GPUs (water-filling): a namespace wanting
    less than its weighted share gets what it wants, the rest is divided again."""
    shares = {ns: 0.0 for ns in demand}
    left, wanting = float(capacity), {ns for ns, d in demand.items() if d > 0}
    while left > 1e-9 and wanting:
        per_weight = left / sum(weights.of(ns) for ns in wanting)
        sated = {ns for ns in wanting if demand[ns] - shares[ns] <= per_weight * weights.of(ns) + 1e-9}
        for ns in sated or wanting:
            give = min(demand[ns] - shares[ns], per_weight * weights.of(ns))
            shares[ns] += give
            left -= give
        wanting -= sated if sated else wanting
    return shares


@dataclass(frozen=True)
class Admission:
    admitted: tuple[TaskRequest, ...]
    held: tuple[Unplaceable, ...] = ()


def _namespace(key: str) -> str:
    return key.split("/", 1)[0]


def task_gpus(plan: Plan, requests: Mapping[str, TaskRequest], unplaced: Iterable[TaskRequest]) -> dict[str, float]:
    """Each task's GPUs: its group's GPUs by token share; an unplaced task, a like placed task's (else 1)."""
    out: dict[str, float] = {}
    for g in plan.groups:
        total = sum(tokens(requests[k]) for k in g.members if k in requests) or 1
        out.update({k: g.gpus * tokens(requests[k]) / total for k in g.members if k in requests})
    like = {(requests[k].base_model, requests[k].shape): v for k, v in out.items()}
    out.update({t.key: like.get((t.base_model, t.shape), 1.0) for t in unplaced if t.key not in out})
    return out


def _usage(keys: Iterable[str], gpus: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in keys:
        out[_namespace(k)] = out.get(_namespace(k), 0.0) + gpus.get(k, 0.0)
    return out


def _queues(competing: Sequence[TaskRequest]) -> dict[str, list[TaskRequest]]:
    out: dict[str, list[TaskRequest]] = {}
    for t in sorted(competing, key=lambda t: (-t.priority, t.created, t.name)):
        out.setdefault(t.namespace, []).append(t)
    return out


def _choose(competing: Sequence[TaskRequest], used: dict[str, float], gpus: Mapping[str, float], capacity: float,
            shares: Mapping[str, float], weights: Weights) -> set[str]:
    """Each namespace admits its tasks, highest priority first, while they stay within its share
    (even where no GPU is free now: the task may preempt); what is left of the GPUs then goes by
    progressive filling (the namespace lowest in GPUs per weight admits its next task if it fits)."""
    queues, chosen = _queues(competing), set()
    for ns, q in queues.items():
        while q and used.get(ns, 0.0) + gpus[q[0].key] <= shares.get(ns, 0.0) + 1e-9:
            t = q.pop(0)
            chosen.add(t.key)
            used[ns] = used.get(ns, 0.0) + gpus[t.key]
    heap = [(used.get(ns, 0.0) / weights.of(ns), ns) for ns, q in queues.items() if q]
    heapq.heapify(heap)
    total = sum(used.values())
    while heap:
        _, ns = heapq.heappop(heap)
        t = queues[ns].pop(0)
        if total + gpus[t.key] > capacity + 1e-9:
            continue  # the rest of this namespace's queue waits: its next task does not fit what is left
        chosen.add(t.key)
        total += gpus[t.key]
        used[ns] = used.get(ns, 0.0) + gpus[t.key]
        if queues[ns]:
            heapq.heappush(heap, (used[ns] / weights.of(ns), ns))
    return chosen


def admit(pending: Sequence[TaskRequest], members: Mapping[str, TaskRequest], trial: Plan,
          weights: Weights) -> Admission:
    """Which pending tasks the planner may place, given the trial plan of all of them."""
    waiting = {u.task for u in trial.unplaceable if u.reason == SHORT}
    if not waiting:
        return Admission(tuple(pending))  # GPUs are not short: everyone is placed
    trial_reason = {u.task: u for u in trial.unplaceable}
    placed = {k for g in trial.groups for k in g.members} - set(members)
    competing = [t for t in pending if t.key in placed or t.key in waiting]
    gpus = task_gpus(trial, {**members, **{t.key: t for t in pending}}, competing)
    capacity = float(sum(g.gpus for g in trial.groups))
    running = _usage(members, gpus)
    shares = fair_shares(capacity, _usage([*members, *(t.key for t in competing)], gpus), weights)
    chosen = _choose(competing, dict(running), gpus, capacity, shares, weights)
    admitted = [t for t in pending if (t.key not in placed and t.key not in waiting) or t.key in chosen]
    # beyond the share: a task the trial placed lost its GPUs to fairness; one it did not place
    # was waiting for GPUs anyway (and must not take GPUs fairness freed)
    held = [Unplaceable(t.key, HELD, f"GPUs are short and namespace {t.namespace} has its fair share: "
                        f"{shares.get(t.namespace, 0):.3g} of {capacity:g} GPU(s) (weight {weights.of(t.namespace):g})")
            if t.key in placed else trial_reason[t.key] for t in competing if t.key not in chosen]
    return Admission(tuple(admitted), tuple(held))


def victims(unplaced: Sequence[TaskRequest], groups: Mapping[str, Sequence[TaskRequest]],
            shares_over: Mapping[str, float]) -> tuple[TaskRequest | None, list[str]]:
    """The highest-priority task the plan could not place, and the members of the one group it
    preempts: every member of a lower priority, the group with the lowest top priority first, then
    the namespace most over its share, then the smallest group."""
    if not unplaced:
        return None, []
    top = min(unplaced, key=lambda t: (-t.priority, t.created, t.key))
    candidates = [(max(m.priority for m in ms), -shares_over.get(_namespace(ms[0].key), 0.0), len(ms), g)
                  for g, ms in groups.items() if ms and max(m.priority for m in ms) < top.priority]
    if not candidates:
        return top, []
    *_, g = min(candidates)
    return top, [m.key for m in groups[g]]


def without_members(group: GroupState, dropped: frozenset) -> GroupState:
    """The group as the planner sees it once the preempted members have left."""
    return replace(group, members=tuple(m for m in group.members if m.key not in dropped))


def plan_fairly(pending: Sequence[TaskRequest], groups: Mapping[str, Sequence[TaskRequest]], run: RunPlanner,
                weights: Weights, releasing: bool) -> Plan:
    """The plan with fair-share admission and, unless a release is under way, one preemption.

    ``groups``: each live group's members (by group name); ``releasing``: a group is being torn
    down (its GPUs are about to be free), so no further group is preempted yet."""
    members = {m.key: m for ms in groups.values() for m in ms}
    trial = run(pending, frozenset())
    adm = admit(pending, members, trial, weights)
    plan = run(adm.admitted, frozenset()) if adm.held else trial
    unplaced = {u.task for u in plan.unplaceable if u.reason == SHORT}
    dropped: list[str] = []
    if unplaced and not releasing:
        usage = _usage(members, task_gpus(trial, members, ()))
        over = {ns: usage[ns] / weights.of(ns) for ns in usage}
        top, dropped = victims([t for t in adm.admitted if t.key in unplaced], groups, over)
        if dropped:
            plan = run([t for t in adm.admitted if t.key not in dropped], frozenset(dropped))
            msg = f"checkpointed and taken out of its group for {top.key} (priority {top.priority}); resumes from " \
                  "the checkpoint when GPUs are free"
            return replace(plan, unplaceable=plan.unplaceable + adm.held
                           + tuple(Unplaceable(k, PREEMPTED, msg) for k in dropped))
    return replace(plan, unplaceable=plan.unplaceable + adm.held) if adm.held else plan
