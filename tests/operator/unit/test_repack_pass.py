"""The controller's repack passes (operator/repacker.py), pass by pass as the controller drives
them: after tasks finish, a half-empty group is drained whole into another of its class; its tasks
wait until the old group's pods are gone (the engine checkpoints them on SIGTERM), then join their
target at its own budget (no pod restart); churn is bounded per pass, between passes and per task.
That a task resumed in another group keeps its exact step sequence is
tests/engine/resume/test_repack_resume.py's (the engine's side of a move)."""
from __future__ import annotations

from muxtune.operator import planner as P
from muxtune.operator.repacker import REPACKING, Repacker

from tests.operator.unit.test_repack import MODELS, _group, _task


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _plan(states):
    return P.plan([], states, [P.NodeInfo("n", 8, 0, 81920, "H100")], MODELS)


def _members(plan):
    return {g.name: set(g.members) for g in plan.groups}


def test_a_pass_drains_a_group_through_checkpoints_then_joins_the_target():
    clock = Clock()
    r = Repacker(max_moves=8, interval=60, task_cooldown=600, clock=clock)
    states = [_group("g1", [_task(f"x{i}") for i in range(5)]), _group("g2", [_task("y0"), _task("y1")])]
    assert not r.due(placing=False)  # nothing finished yet: no pass
    r.members_left = True  # a member left a group (finished)
    assert not r.due(placing=True)  # a pass that places tasks first
    assert r.due(placing=False)
    plan = r.run(_plan(states), states, MODELS, P.PlannerConfig())
    assert _members(plan)["g2"] == set()  # the donor is emptied: the applier tears it down (SIGTERM)
    assert {u.task for u in plan.unplaceable if u.reason == REPACKING} == {"a/y0", "a/y1"}
    assert r.moves == 2 and r.passes == 1
    # while g2's pods are still there the tasks are held: not planned, not in any group
    held = r.held(lambda name: name == "g2")
    assert held == {"a/y0", "a/y1"}
    requests = {t.key: t for t in (_task("y0"), _task("y1"))}
    assert r.arrivals(states[:1], requests, held) == states[:1]
    # g2's pods are gone (checkpoints written): the tasks are members of g1's state, at g1's budget
    joined = r.arrivals(states[:1], requests, r.held(lambda name: False))
    plan = _plan(joined)
    (g1,) = plan.groups
    assert set(g1.members) == {f"a/x{i}" for i in range(5)} | {"a/y0", "a/y1"}
    assert g1.token_budget == 4096 and not plan.new_groups  # a hot add: g1's pods keep running
    r.settle({"a/y0": ("a", "g1"), "a/y1": ("a", "g1")}, requests, {"g1"})
    assert not r.moving


def test_churn_is_bounded_between_passes_and_per_task():
    clock = Clock()
    r = Repacker(max_moves=4, interval=60, task_cooldown=600, clock=clock)
    three = [_group(f"g{i}", [_task(f"t{i}-{j}") for j in range(3)]) for i in range(3)]
    r.members_left = True
    r.run(_plan(three), three, MODELS, P.PlannerConfig())
    assert r.moves == 3 and len({mv.source for mv in r.moving.values()}) == 1  # <= max_moves, whole groups
    assert not r.due(placing=False)  # a move in flight: no second pass
    r.settle({k: ("a", mv.target) for k, mv in r.moving.items()}, [t.key for g in three for t in g.members],
             {"g0", "g1", "g2"})
    r.members_left = True
    clock.t += 30
    assert not r.due(placing=False)  # passes at least `interval` apart
    clock.t += 31
    assert r.due(placing=False)
    # a group holding a task moved within the cooldown is not drained again
    moved = next(iter(r.moved_at))
    after = [_group("g0", [_task(f"t0-{j}") for j in range(3)]), _group("g9", [_task(moved.split("/")[1])])]
    r.run(_plan(after), after, MODELS, P.PlannerConfig())
    assert r.moves == 3 and not r.moving
    clock.t += 601  # past the cooldown the pin is gone
    r.settle({}, [], set())
    assert not r.moved_at
    r.members_left, clock.t = True, clock.t + 60
    r.run(_plan(after), after, MODELS, P.PlannerConfig())
    assert r.moves == 4 and set(r.moving) == {moved}


def test_a_move_whose_target_is_gone_goes_back_to_the_planner():
    r = Repacker()
    states = [_group("g1", [_task(f"x{i}") for i in range(5)]), _group("g2", [_task("y0")])]
    r.members_left = True
    r.run(_plan(states), states, MODELS, P.PlannerConfig())
    assert set(r.moving) == {"a/y0"}
    r.settle({}, {"a/y0"}, {"g2"})  # g1 was deleted meanwhile
    assert not r.moving
