"""Fair share between namespaces and priority preemption (operator/fairshare.py) over the real
planner: pure functions, no cluster."""
from __future__ import annotations

from muxtune.operator import fairshare as F
from muxtune.operator import memory as M
from muxtune.operator import planner as P
from tests.operator.unit.test_planner import H100, MODELS, nodes, task

CFG = P.PlannerConfig(max_tasks_per_group=2)  # 2 GPUs x 2 tasks: 4 task slots
INVENTORY = nodes(n=1, gpus=2)


def runner(groups: list[P.GroupState], inventory=INVENTORY):
    """What the controller passes in: the planner over the groups less the dropped members."""
    def run(pending, dropped):
        states = [P.GroupState(g.name, g.namespace, g.base_model, g.tenancy, g.parallelism, g.gpu_memory_mib,
                               g.gpu_product, members=tuple(m for m in g.members if m.key not in dropped))
                  for g in groups]
        return P.plan(pending, states, inventory if not groups else nodes(n=1, gpus=2, free=0), MODELS, CFG)
    return run


def placed_by_namespace(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in plan.groups:
        for k in g.members:
            out[k.split("/")[0]] = out.get(k.split("/")[0], 0) + 1
    return out


def test_fair_shares_are_weighted_max_min():
    w = F.Weights()
    assert F.fair_shares(16, {"a": 1000, "b": 10}, w) == {"a": 8, "b": 8}
    assert F.fair_shares(16, {"a": 1000, "b": 2}, w) == {"a": 14, "b": 2}  # what b leaves goes to a
    assert F.fair_shares(16, {"a": 1000, "b": 1000}, F.Weights({"b": 3})) == {"a": 4, "b": 12}
    assert F.fair_shares(3, {"a": 5, "b": 5, "c": 0}, w) == {"a": 1.5, "b": 1.5, "c": 0}  # GPUs: fractions too


def test_a_burst_from_one_namespace_does_not_take_every_gpu():
    """Without fair share the planner is first come, first served: team-a's 20 older tasks take all
    4 slots. With it, team-b gets half of them."""
    burst = [task(f"a{i:02d}", ns="team-a", created="2025-01-01T00:00:00Z") for i in range(20)]
    late = [task(f"b{i}", ns="team-b", created="2025-01-02T00:00:00Z") for i in range(4)]
    fcfs = runner([])(burst + late, frozenset())
    assert placed_by_namespace(fcfs) == {"team-a": 4}
    plan = F.plan_fairly(burst + late, {}, runner([]), F.Weights(), releasing=False)
    assert placed_by_namespace(plan) == {"team-a": 2, "team-b": 2}
    held = {u.task: u for u in plan.unplaceable if u.reason == F.HELD}
    assert sorted(held) == ["team-a/a02", "team-a/a03"]  # the slots fairness gave to team-b; oldest kept
    assert "fair share: 1 of 2 GPU(s)" in held["team-a/a03"].message
    assert {u.reason for u in plan.unplaceable if u.task not in held} == {"WaitingForGpus"}
    # weights: 4 GPUs (8 slots) split 3:1
    weighted = F.plan_fairly(burst + late, {}, runner([], nodes(n=1, gpus=4)), F.Weights({"team-a": 3}), False)
    assert placed_by_namespace(weighted) == {"team-a": 6, "team-b": 2}


def test_gpus_not_short_changes_nothing():
    few = [task("a0", ns="team-a"), task("b0", ns="team-b")]
    assert F.plan_fairly(few, {}, runner([]), F.Weights(), False) == runner([])(few, frozenset())


def test_a_higher_priority_task_preempts_one_lower_priority_group():
    """Both GPUs run team-a's priority-0 groups; team-b's priority-1000 task takes one group's
    members out (they checkpoint and wait), and nothing more while that release is under way."""
    def group(name, n, prio=0):
        members = tuple(task(f"{name}-{i}", ns="team-a", prio=prio) for i in range(n))
        return P.GroupState(name, "team-a", "model:llama7b", "team-a", M.Parallelism(), H100,
                            "NVIDIA-H100-80GB-HBM3", members=members)
    groups = [group("g1", 2), group("g2", 1)]
    urgent = task("urgent", ns="team-b", prio=1000)
    by_name = {g.name: list(g.members) for g in groups}
    plan = F.plan_fairly([urgent], by_name, runner(groups), F.Weights(), releasing=False)
    reasons = {u.task: u for u in plan.unplaceable}
    preempted = sorted(k for k, u in reasons.items() if u.reason == F.PREEMPTED)
    assert preempted == ["team-a/g2-0"]  # the smaller group of the lowest priority
    assert "team-b/urgent (priority 1000)" in reasons["team-a/g2-0"].message
    assert not [g for g in plan.groups if set(g.members) & set(preempted)]
    # while g2 is going, no second group is taken; equal priorities never preempt
    again = F.plan_fairly([urgent], by_name, runner(groups), F.Weights(), releasing=True)
    assert not [u for u in again.unplaceable if u.reason == F.PREEMPTED]
    peer = task("peer", ns="team-b", prio=0)
    assert not [u for u in F.plan_fairly([peer], by_name, runner(groups), F.Weights(), False).unplaceable
                if u.reason == F.PREEMPTED]


def test_slo_floors_keep_too_tight_serving_tasks_pending():
    """A serving task's SLOs bound its whole group's training; below the admin's floor it waits."""
    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.operator import slofloor

    def serving(ttft, tpot, enabled=True):
        return FineTuneTask.model_validate({
            "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": "s", "namespace": "a"},
            "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": "d.jsonl"}, "training": {"maxSteps": 4, "learningRate": 0.001},
                     "serving": {"enabled": enabled, "sloTtftMs": ttft, "sloTpotMs": tpot}}})

    floors = slofloor.SloFloors(ttft_ms=200, tpot_ms=20)
    r = slofloor.refusal(serving(1000, 0.001), floors)
    assert r is not None and r.reason == "SloBelowFloor" and not r.final
    assert "spec.serving.sloTpotMs is 0.001 ms, below the cluster's floor of 20 ms" in r.message
    assert "sloTtftMs" not in r.message
    assert slofloor.refusal(serving(200, 20), floors) is None
    assert slofloor.refusal(serving(1, 0.001, enabled=False), floors) is None  # not served: no SLO applies
    assert slofloor.refusal(serving(1, 0.001), slofloor.SloFloors()) is None


def test_a_namespace_alone_waits_for_gpus_not_for_its_fair_share():
    """With one namespace competing, tasks the GPUs cannot take say WaitingForGpus (fairness held nothing)."""
    def group(name):
        return P.GroupState(name, "team-a", "model:llama7b", "team-a", M.Parallelism(), H100,
                            "NVIDIA-H100-80GB-HBM3", members=(task(f"{name}-0", ns="team-a"), task(f"{name}-1", ns="team-a")))
    groups = [group("g1"), group("g2")]
    more = [task(f"more-{i}", ns="team-a") for i in range(3)]
    plan = F.plan_fairly(more, {g.name: list(g.members) for g in groups}, runner(groups), F.Weights(), False)
    assert {u.reason for u in plan.unplaceable} == {"WaitingForGpus"}


def test_fair_shares_count_gpus_not_tasks():
    """team-a's tasks need 2 GPUs each (llama70b: tp=2), team-b's one (llama7b). On 8 GPUs each
    namespace gets 4 GPUs: 2 of team-a's tasks, 4 of team-b's (counting tasks would give each 2
    tasks: 4 GPUs to team-a, 2 to team-b, 2 left idle)."""
    cfg = P.PlannerConfig(max_tasks_per_group=1)

    def run(pending, dropped):
        return P.plan(pending, [], nodes(n=1, gpus=8), MODELS, cfg)

    big = [task(f"a{i}", ns="team-a", model="model:llama70b", created="2025-01-01T00:00:00Z") for i in range(10)]
    small = [task(f"b{i}", ns="team-b", created="2025-01-02T00:00:00Z") for i in range(10)]
    assert {g.members[0].split("/")[0] for g in run(big + small, frozenset()).groups} == {"team-a"}  # FCFS
    plan = F.plan_fairly(big + small, {}, run, F.Weights(), releasing=False)
    gpus: dict[str, int] = {}
    for g in plan.groups:
        gpus[g.members[0].split("/")[0]] = gpus.get(g.members[0].split("/")[0], 0) + g.gpus
    assert gpus == {"team-a": 4, "team-b": 4} and placed_by_namespace(plan) == {"team-a": 2, "team-b": 4}
    held = {u.task: u for u in plan.unplaceable if u.reason == F.HELD}
    assert sorted(held) == ["team-a/a2", "team-a/a3"]  # the trial placed a0..a3; fairness gave two to team-b
    assert "fair share: 4 of 8 GPU(s)" in held["team-a/a3"].message
    # weight 3 for team-b: 6 of the 8 GPUs (six 1-GPU tasks), team-a one 2-GPU task
    weighted = F.plan_fairly(big + small, {}, run, F.Weights({"team-b": 3}), False)
    assert placed_by_namespace(weighted) == {"team-a": 1, "team-b": 6}


def test_gpu_shares_of_tasks_in_one_group_follow_their_tokens():
    """A task's GPUs are its group's by token share, as quota charges them."""
    g = P.GroupPlan("g", "ns", "model:llama7b", None, M.Parallelism(dp=2), "p", H100, ("a/x", "b/y"), 0, True, True)
    reqs = {"a/x": task("x", ns="a", batch=8, seq=512), "b/y": task("y", ns="b", batch=8, seq=1536)}
    plan = P.Plan((), (g,), (), 2, 2, 0, 0, 0)
    waiting = [task("z", ns="c", batch=8, seq=512), task("w", ns="c", batch=8, seq=256)]
    # a waiting task counts as a like placed one (z as x), else as one GPU (w)
    assert F.task_gpus(plan, reqs, waiting) == {"a/x": 0.5, "b/y": 1.5, "c/z": 0.5, "c/w": 1.0}
