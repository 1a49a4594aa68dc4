"""Tasks that arrive over several reconcile passes pack as if planned at once (the scale test's
CI failure: 35 GPUs where one plan of the same workload takes 23). A group opened for the tasks
known then takes the largest token budget its GPUs hold, which left no memory for the tasks that
came later; until a member has run a step, the planner lowers that budget to take them in."""
from __future__ import annotations

import random

import pytest

from bench import operator_scale as bench
from muxtune.api.basemodel import Architecture
from muxtune.api.finetunetask import FineTuneTask
from muxtune.operator import memory as M
from muxtune.operator import planner as P
from muxtune.operator import podspec

LLAMA7B = Architecture(**bench.LLAMA7B)
NAMESPACES = [f"ns{i}" for i in range(4)]


def _scale_workload():
    """The scale test's workload (150 tasks, 4 namespaces, 40 kwok nodes), as the planner sees it."""
    reqs = [P.TaskRequest.from_task(FineTuneTask.model_validate(d)) for d in bench.make_tasks(150, NAMESPACES)]
    reqs = [P.TaskRequest(**{**r.__dict__, "uid": r.key, "created": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z"})
            for i, r in enumerate(reqs)]
    nodes = [P.NodeInfo(d["metadata"]["name"], 8, 8, int(d["metadata"]["labels"]["nvidia.com/gpu.memory"]),
                        d["metadata"]["labels"]["nvidia.com/gpu.product"]) for d in bench.make_nodes(40, 8, "n")]
    archs = {f"bench-{name}": Architecture(parameters=p, layers=L, hidden_size=h, num_attention_heads=a,
                                           vocab_size=32000, dtype="bfloat16")
             for name, (p, L, h, a) in bench.BASEMODELS.items()}
    return reqs, nodes, archs


def _as_states(plan: P.Plan, by_key, started: bool) -> list[P.GroupState]:
    return [P.GroupState(g.name, g.namespace, g.base_model, g.tenancy, g.parallelism, g.gpu_memory_mib, g.gpu_product,
                         tuple(by_key[k] for k in g.members), queue=g.queue, token_budget=g.token_budget,
                         recompute=g.recompute, started=started) for g in plan.groups if g.members]


def _in_passes(reqs, nodes, archs, passes: int, seed: int, started: bool) -> P.Plan:
    """Plan the tasks as they arrive, in ``passes`` random slices, each with the groups so far."""
    cuts = sorted(random.Random(seed).sample(range(1, len(reqs)), passes - 1))
    by_key, states, plan = {r.key: r for r in reqs}, [], None
    for a, b in zip([0, *cuts], [*cuts, len(reqs)]):
        plan = P.plan(reqs[a:b], states, nodes, archs)
        states = _as_states(plan, by_key, started)
    return plan


@pytest.mark.parametrize("passes,seed", [(2, 1), (3, 2), (10, 2)])
def test_tasks_arriving_over_passes_pack_as_one_plan(passes, seed):
    reqs, nodes, archs = _scale_workload()
    one_shot = P.plan(reqs, [], nodes, archs).gpus_allocated
    fixed = _in_passes(reqs, nodes, archs, passes, seed, started=True)
    lowered = _in_passes(reqs, nodes, archs, passes, seed, started=False)
    assert fixed.gpus_allocated > 1.2 * one_shot  # what CI saw: budgets fixed at opening fragment
    assert not lowered.unplaceable and sum(len(g.members) for g in lowered.groups) == len(reqs)
    assert lowered.gpus_allocated <= one_shot, (lowered.gpus_allocated, one_shot)
    for g in lowered.groups:  # every group still fits its GPUs at the budget it ends with
        assert g.memory_per_gpu_bytes <= g.gpu_memory_mib * M.MiB


def _group_of(req, budget=32768, started=False):
    return P.GroupState("g", "ns", "model:llama7b", "ns", M.Parallelism(), 81920, "H100", (req,),
                        token_budget=budget, recompute=False, started=started)


def test_budget_is_lowered_only_before_the_first_step():
    a, b = (P.TaskRequest("ns", n, "model:llama7b", shape=M.TaskShape(r=64, batch_size=16, max_seq_len=1024))
            for n in ("a", "b"))
    node = [P.NodeInfo("n", 8, 7, 81920, "H100")]
    archs = {"llama7b": LLAMA7B}
    fresh = P.plan([b], [_group_of(a)], node, archs)
    (g,) = fresh.groups
    assert g.members == ("ns/a", "ns/b") and g.token_budget < 32768 and g.changed  # lowered: its pods restart
    assert g.memory_per_gpu_bytes <= 81920 * M.MiB
    running = P.plan([b], [_group_of(a, started=True)], node, archs)
    kept = next(x for x in running.groups if x.name == "g")
    assert kept.members == ("ns/a",) and kept.token_budget == 32768  # a started group keeps its budget
    assert len(running.groups) == 2


def test_pods_with_another_budget_are_restarted():
    spec = {"tokenBudget": 2048, "recompute": True}
    pod = {"annotations": {"muxtune.io/engine-budget": podspec.engine_budget({"tokenBudget": 32768})}}
    assert podspec.runs_other_budget(pod, spec)
    assert not podspec.runs_other_budget({"annotations": {"muxtune.io/engine-budget": "2048+recompute"}}, spec)
    assert not podspec.runs_other_budget({"annotations": {}}, spec)  # written before pods recorded it
