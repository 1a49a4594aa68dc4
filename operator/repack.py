"""Repacking: when tasks finish, groups of one class (backbone, tenancy, queue) are left half empty;
emptying one whole group into the others frees its GPUs. Pure and deterministic, as the planner.

A move is a task leaving its group through its checkpoint and resuming in another: the engine saves
a cut when a member is dropped and a task resumes from its newest cut, mid-step included (the
engine's resume tests, and tests/engine/test_repack_resume.py: the moved task's step sequence is
the uninterrupted one), so no task loses a step. Churn is bounded: only a whole group is drained (a
partial drain frees no GPU), the groups with the fewest members first; a group that receives tasks
is never drained in the same pass and a task moves at most once per pass; at most ``max_moves``
tasks move per pass (the caller runs a pass when members finish, not on every reconcile).
Targets take each task at their own fixed token budget and recompute, so no pod restarts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from muxtune.api.basemodel import Architecture
from muxtune.operator.budget import fast_tokens
from muxtune.operator.planner import GroupState, PlannerConfig, _Architectures, _Capacity, _existing_groups, _Run


@dataclass(frozen=True)
class Move:
    task: str  # namespace/name
    source: str  # the group it leaves (drained whole)
    target: str  # the group it resumes in, from its checkpoint


def plan_repack(groups: Sequence[GroupState], basemodels: Mapping[str, Architecture | None],
                config: PlannerConfig = PlannerConfig(), max_moves: int = 8,
                pinned: frozenset[str] = frozenset()) -> tuple[Move, ...]:
    """Moves that drain whole groups into groups of the same class with room; fewest members first.
    A group with a ``pinned`` member (one moved recently) is not drained."""
    run = _Run(config, _Capacity([]), _Architectures(basemodels), set())
    opens = _existing_groups(groups, run)
    requests = {m.key: m for g in groups for m in g.members}
    moves: list[Move] = []
    receivers: set[str] = set()
    for donor in sorted((g for g in opens if g.accepting and g.members), key=lambda g: (len(g.members), -g.par.gpus, g.name)):
        if donor.name in receivers or len(moves) + len(donor.members) > max_moves or pinned & set(donor.members):
            continue
        targets = [g for g in opens if g is not donor and g.accepting]
        placed = _drain(donor, targets, requests, config)
        if placed is None:
            continue
        donor.accepting = False  # drained: neither a target nor a donor again in this pass
        receivers.update(placed.values())
        moves += [Move(key, donor.name, target) for key, target in placed.items()]
    return tuple(moves)


def _drain(donor, targets, requests, config: PlannerConfig) -> dict[str, str] | None:
    """Every member of ``donor`` first-fit into ``targets`` (task -> target), or None and nothing changed."""
    done: list[tuple[object, object]] = []
    for key, mem in zip(donor.members, donor.mems):
        t = requests[key]
        target = next((g for g in targets if g.accepts(t, mem, config)), None)
        if target is None:
            for g, u in reversed(done):  # undo: the donor stays as it is
                g.members.pop()
                g.mems.pop()
                g.fast_tokens -= fast_tokens(u, g.par, config)
                g.acc = None
            return None
        target.add(t, mem, config)
        done.append((target, t))
    return {t.key: g.name for g, t in done}
