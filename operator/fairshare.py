"""Fair share between namespaces, and priority preemption, around the placement planner.

When every pending task fits, nothing changes: the planner places them all. When GPUs are short
(a trial plan leaves tasks WaitingForGpus), first come, first served would let one namespace's
burst take every GPU; instead the task slots the plan achieves are divided between the namespaces
that want them by weighted max-min fairness (water-filling: a namespace wanting less than its
share gets what it wants, the rest is split again), and each namespace's pending tasks are
admitted, highest priority first, up to its share less the tasks it already runs. Shares count
tasks, the unit the planner packs; a namespace's weight comes from the operator's configuration.

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


def fair_shares(capacity: int, demand: Mapping[str, int], weights: Weights) -> dict[str, int]:
    """Weighted max-min fair division of ``capacity`` slots: each slot goes to the namespace with
    the lowest (slots + 1) / weight that still wants one (ties by name, so the result is stable)."""
    shares = {ns: 0 for ns in demand}
    heap = [(1 / weights.of(ns), ns) for ns, d in demand.items() if d > 0]
    heapq.heapify(heap)
    for _ in range(max(0, capacity)):
        if not heap:
            break
        _, ns = heapq.heappop(heap)
        shares[ns] += 1
        if shares[ns] < demand[ns]:
            heapq.heappush(heap, ((shares[ns] + 1) / weights.of(ns), ns))
    return shares


@dataclass(frozen=True)
class Admission:
    admitted: tuple[TaskRequest, ...]
    held: tuple[Unplaceable, ...] = ()


def _namespace(key: str) -> str:
    return key.split("/", 1)[0]


def _count(keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[_namespace(k)] = out.get(_namespace(k), 0) + 1
    return out


def admit(pending: Sequence[TaskRequest], members: Iterable[str], trial: Plan, weights: Weights) -> Admission:
    """Which pending tasks the planner may place, given the trial plan of all of them."""
    waiting = {u.task for u in trial.unplaceable if u.reason == SHORT}
    if not waiting:
        return Admission(tuple(pending))  # GPUs are not short: everyone is placed
    members = list(members)
    trial_reason = {u.task: u for u in trial.unplaceable}
    placed = {k for g in trial.groups for k in g.members} - set(members)
    competing = [t for t in pending if t.key in placed or t.key in waiting]
    running = _count(members)
    demand = _count([*members, *(t.key for t in competing)])
    shares = fair_shares(len(members) + len(placed), demand, weights)
    admitted, held = [t for t in pending if t.key not in placed and t.key not in waiting], []
    by_ns: dict[str, list[TaskRequest]] = {}
    for t in competing:
        by_ns.setdefault(t.namespace, []).append(t)
    for ns, tasks in sorted(by_ns.items()):
        room = max(0, shares.get(ns, 0) - running.get(ns, 0))
        tasks.sort(key=lambda t: (-t.priority, t.created, t.name))
        admitted += tasks[:room]
        # beyond the share: a task the trial placed lost its slot to fairness; one it did not place
        # was waiting for GPUs anyway (and must not take a slot fairness freed)
        held += [Unplaceable(t.key, HELD, f"GPUs are short and namespace {ns} has its fair share: "
                             f"{shares.get(ns, 0)} of {len(members) + len(placed)} task slots "
                             f"(weight {weights.of(ns):g})") if t.key in placed else trial_reason[t.key]
                 for t in tasks[room:]]
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
    members = [m.key for ms in groups.values() for m in ms]
    trial = run(pending, frozenset())
    adm = admit(pending, members, trial, weights)
    plan = run(adm.admitted, frozenset()) if adm.held else trial
    unplaced = {u.task for u in plan.unplaceable if u.reason == SHORT}
    dropped: list[str] = []
    if unplaced and not releasing:
        usage = _count(members)
        over = {ns: usage[ns] / weights.of(ns) for ns in usage}
        top, dropped = victims([t for t in adm.admitted if t.key in unplaced], groups, over)
        if dropped:
            plan = run([t for t in adm.admitted if t.key not in dropped], frozenset(dropped))
            msg = f"checkpointed and taken out of its group for {top.key} (priority {top.priority}); resumes from " \
                  "the checkpoint when GPUs are free"
            return replace(plan, unplaceable=plan.unplaceable + adm.held
                           + tuple(Unplaceable(k, PREEMPTED, msg) for k in dropped))
    return replace(plan, unplaceable=plan.unplaceable + adm.held) if adm.held else plan
