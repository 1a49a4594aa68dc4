"""The controller's repack passes (operator/repack.py plans the moves): when tasks finish, a group
of one class that other groups of that class can hold is drained into them, through checkpoints.

A move has two phases, so that no task loses a step:
1. drain: the donor leaves the plan with no members; the applier deletes it, its pods get SIGTERM
   and the engine finishes the round in flight, checkpoints every task and exits. The moving tasks
   are held out of planning meanwhile (status Pending, reason Repacking).
2. join: once none of the donor's pods is left, each moving task is a member of its target's
   state; the target's ConfigMap lists it and its engine resumes it from the newest checkpoint
   (tests/engine/resume/test_repack_resume.py: the step sequence is the uninterrupted one).
   A target that is gone or full lets the task go back to the planner.

Churn is bounded: one pass at a time (none while a move is in flight, nor in a pass that places
tasks: tasks that cannot be placed do not stop it, the GPUs it frees may be theirs), passes at least ``interval`` seconds apart and only after a member left a group, at most
``max_moves`` tasks a pass (whole groups only: a partial drain frees no GPU), and a task moved in
the last ``task_cooldown`` seconds pins its group (it is not moved again). Targets keep their
budget and pods (repack.plan_repack hot-adds at the fixed budget).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Mapping, Sequence

from muxtune.api.basemodel import Architecture
from muxtune.operator.placement import GroupState, Plan, PlannerConfig, TaskRequest, Unplaceable
from muxtune.operator.repack import Move, plan_repack

REPACKING = "Repacking"


@dataclasses.dataclass
class Repacker:
    max_moves: int = 8
    interval: float = 60.0  # seconds between passes
    task_cooldown: float = 600.0  # seconds a moved task pins its group
    clock: Callable[[], float] = time.monotonic
    moving: dict[str, Move] = dataclasses.field(default_factory=dict)  # task -> move under way
    moved_at: dict[str, float] = dataclasses.field(default_factory=dict)
    last_pass: float = float("-inf")
    members_left: bool = False  # a member left a group since the last pass
    passes: int = 0
    moves: int = 0

    def settle(self, member_of: Mapping[str, tuple[str, str]], live: Iterable[str], groups: Iterable[str]) -> None:
        """Forget the moves whose task joined its target or is gone; one whose target is gone goes
        back to the planner."""
        live, groups = set(live), set(groups)
        for k, mv in list(self.moving.items()):
            if k not in live or k in member_of or mv.target not in groups:
                del self.moving[k]
        now = self.clock()
        for k in [k for k, t in self.moved_at.items() if now - t > self.task_cooldown]:
            del self.moved_at[k]

    def held(self, draining: Callable[[str], bool]) -> set[str]:
        """Moving tasks whose donor group still has pods: not yet checkpointed, not to be placed."""
        return {k for k, mv in self.moving.items() if draining(mv.source)}

    def arrivals(self, states: Sequence[GroupState], requests: Mapping[str, TaskRequest],
                 held: set[str]) -> list[GroupState]:
        """The group states with each checkpointed moving task a member of its target."""
        joining: dict[str, list[TaskRequest]] = {}
        for k, mv in sorted(self.moving.items()):
            if k not in held and k in requests:
                joining.setdefault(mv.target, []).append(requests[k])
        return [dataclasses.replace(s, members=(*s.members, *joining[s.name])) if s.name in joining and s.accepting
                else s for s in states]

    def joined(self, states: Sequence[GroupState]) -> set[str]:
        return {m.key for s in states for m in s.members if m.key in self.moving}

    def due(self, placing: bool) -> bool:
        """A pass may run: a member left a group, no move is under way, this pass places no task
        (a receiver must not take moved tasks on top of new ones), and ``interval`` has passed."""
        return (not self.moving and not placing and self.members_left
                and self.clock() - self.last_pass >= self.interval)

    def run(self, plan: Plan, states: Sequence[GroupState], basemodels: Mapping[str, Architecture | None],
            config: PlannerConfig) -> Plan:
        """One pass: the moves, with their donors emptied in ``plan`` (which the applier then tears down)."""
        self.last_pass, self.members_left = self.clock(), False
        pinned = frozenset(self.moved_at)
        moves = plan_repack(states, basemodels, config, self.max_moves, pinned)
        self.passes += 1
        if not moves:
            return plan
        now = self.clock()
        for mv in moves:
            self.moving[mv.task] = mv
            self.moved_at[mv.task] = now
        self.moves += len(moves)
        donors = {mv.source for mv in moves}
        groups = tuple(dataclasses.replace(g, members=(), changed=True) if g.name in donors else g for g in plan.groups)
        return dataclasses.replace(plan, groups=groups,
                                   unplaceable=(*plan.unplaceable, *self.unplaceable({mv.task for mv in moves})))

    def unplaceable(self, held: set[str]) -> tuple[Unplaceable, ...]:
        return tuple(Unplaceable(k, REPACKING, f"moving from group {self.moving[k].source} to "
                                 f"{self.moving[k].target} through its checkpoint") for k in sorted(held))
