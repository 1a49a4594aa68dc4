"""Token budgets chosen with the layout (issue 16): the planner sizes a group for one budget's round,
the budget reaches the pods, and on the test and the mixed workloads the GPUs stay within 1.2 x the
floor that weight copies and adapter state alone need."""
from __future__ import annotations

import time

import pytest

from bench import operator_scale as bench
from muxtune.api.basemodel import Architecture
from muxtune.operator import memory as M
from muxtune.operator import planner as P
from muxtune.operator import resources, world
from muxtune.operator.config import OperatorConfig

LLAMA7B = Architecture(**bench.LLAMA7B)
H100 = 81920


def _plan_timed(reqs, nodes, archs):
    t0 = time.process_time()  # this process's CPU time: the shared machine's load does not count
    p = P.plan(reqs, [], nodes, archs)
    return p, time.process_time() - t0


@pytest.mark.parametrize("workload", [bench.test_workload, bench.mixed_workload], ids=["test-1000", "mixed-720"])
def test_gpus_within_the_floor(workload):
    reqs, nodes, archs = workload()
    p, cpu = _plan_timed(reqs, nodes, archs)
    assert not p.unplaceable and len(p.placements) == len(reqs)
    assert p.floor_gpus <= p.gpus_allocated <= 1.2 * p.floor_gpus, (p.gpus_allocated, p.floor_gpus)
    assert p.lower_bound_gpus_by_tenancy <= p.gpus_allocated
    assert cpu < 5.0, cpu
    for g in p.groups:  # every group's planned peak fits its GPUs at its budget
        assert g.memory_per_gpu_bytes <= g.gpu_memory_mib * M.MiB
        assert g.token_budget >= max(r.shape.seq_len for r in reqs if r.key in g.members)


def test_budget_bounds_activations_whatever_the_members():
    mems = [M.task_memory(M.TaskShape(batch_size=8, max_seq_len=512), LLAMA7B) for _ in range(8)]
    gpu = H100 * M.MiB
    fused = [M.rank_memory(LLAMA7B, mems[:n], M.Parallelism(), gpu)[0].activations for n in (1, 8)]
    capped = [M.rank_memory(LLAMA7B, mems[:n], M.Parallelism(), gpu, token_budget=2048)[0].activations for n in (1, 8)]
    assert capped[0] == capped[1] < fused[0] < fused[1]  # one round holds 2048 of the 4096+ tokens
    big = M.rank_memory(LLAMA7B, mems[:1], M.Parallelism(), gpu, token_budget=1 << 20)[0].activations
    assert big == fused[0]  # a budget above the step changes nothing
    recomputed = M.rank_memory(LLAMA7B, mems, M.Parallelism(), gpu, token_budget=2048, recompute=True)[0]
    assert recomputed.activations < capped[1] / 3
    piped = M.rank_memory(LLAMA7B, mems, M.Parallelism(pp=2), gpu, token_budget=2048)
    assert all(r.activations <= capped[1] for r in piped)


def test_choose_budget_uses_what_memory_is_left():
    req = P.TaskRequest("ns", "a", "model:llama7b", shape=M.TaskShape(batch_size=8, max_seq_len=1024))
    small = P.plan([req], [], [P.NodeInfo("n", 1, 1, 40960, "A100-40GB")], {"llama7b": LLAMA7B})
    large = P.plan([req], [], [P.NodeInfo("n", 1, 1, H100, "H100")], {"llama7b": LLAMA7B})
    (gs,), (gl,) = small.groups, large.groups
    assert gs.token_budget <= gl.token_budget and gl.token_budget >= 8192
    for g in (gs, gl):
        mem = M.task_memory(req.shape, LLAMA7B)
        assert M.group_memory_per_gpu(LLAMA7B, [mem], g.parallelism, g.gpu_memory_mib * M.MiB,
                                      token_budget=g.token_budget, recompute=g.recompute) <= g.gpu_memory_mib * M.MiB


def test_recompute_when_memory_is_short():
    # 24 GB GPUs: a 7B's weights leave ~8 GB; without recompute the budget would fall below the target
    req = P.TaskRequest("ns", "a", "model:llama7b", shape=M.TaskShape(batch_size=8, max_seq_len=512))
    (g,) = P.plan([req], [], [P.NodeInfo("n", 1, 1, 24576, "L4")], {"llama7b": LLAMA7B}).groups
    assert g.recompute and g.token_budget >= P.PlannerConfig().target_token_budget


def test_speed_band_gets_its_whole_step_and_more_gpus():
    """priority >= fast_priority (100): the group's budget holds every such member's whole step in one
    round; tasks that do not fit together open their own groups (more GPUs, no turns)."""
    shape = M.TaskShape(batch_size=16, max_seq_len=2048)  # 32768 tokens a step
    slow = [P.TaskRequest("ns", f"s{i}", "model:llama7b", shape=shape) for i in range(4)]
    fast = [P.TaskRequest("ns", f"f{i}", "model:llama7b", shape=shape, priority=100) for i in range(4)]
    nodes = [P.NodeInfo(f"n{i}", 8, 8, H100, "H100") for i in range(2)]
    ps, pf = P.plan(slow, [], nodes, {"llama7b": LLAMA7B}), P.plan(fast, [], nodes, {"llama7b": LLAMA7B})
    assert ps.gpus_allocated == 1 and pf.gpus_allocated > 1
    for g in pf.groups:
        assert g.token_budget >= 32768 * len(g.members)


def test_token_budget_reaches_the_pod_and_comes_back():
    req = P.TaskRequest("ns", "a", "model:llama7b", shape=M.TaskShape(batch_size=8, max_seq_len=512), uid="u")
    (gp,) = P.plan([req], [], [P.NodeInfo("n", 1, 1, 24576, "L4")], {"llama7b": LLAMA7B}).groups
    group = resources.group_manifest(gp, [{"metadata": {"name": "a", "namespace": "ns", "uid": "u"}}])
    group["metadata"]["uid"] = "g"
    assert group["spec"]["tokenBudget"] == gp.token_budget and group["spec"]["recompute"] is gp.recompute is True
    args = resources.pod_manifest(group, 0, OperatorConfig(output_host_path="/srv/out"))["spec"]["containers"][0]["args"]
    assert args[args.index("--token-budget") + 1] == str(gp.token_budget) and "--recompute" in args
    state = world.group_state(group, [req], 0, True)
    assert (state.token_budget, state.recompute) == (gp.token_budget, True)
    # a group written before budgets reached pods runs with the engine's default (4096)
    legacy = {**group, "spec": {k: v for k, v in group["spec"].items() if k != "recompute"} | {"tokenBudget": 1024}}
    assert (world.group_state(legacy, [req], 0, True).token_budget, world.group_state(legacy, [req], 0, True).recompute) == (4096, False)


def test_hot_add_sizes_an_existing_group_at_its_budget():
    member = P.TaskRequest("ns", "m", "model:llama7b", shape=M.TaskShape(batch_size=8, max_seq_len=512))
    new = P.TaskRequest("ns", "n", "model:llama7b", shape=M.TaskShape(batch_size=8, max_seq_len=512))
    nodes = [P.NodeInfo("n", 8, 8, 24576, "L4")]
    tight = P.GroupState("mt-x", "ns", "model:llama7b", "ns", M.Parallelism(), 24576, "L4", members=(member,),
                         token_budget=8192, recompute=False)  # already over: nothing joins it
    p = P.plan([new], [tight], nodes, {"llama7b": LLAMA7B})
    assert p.placements[0].group != "mt-x"
    roomy = P.GroupState("mt-x", "ns", "model:llama7b", "ns", M.Parallelism(), 24576, "L4", members=(member,),
                         token_budget=1024, recompute=True)
    assert P.plan([new], [roomy], nodes, {"llama7b": LLAMA7B}).placements[0].group == "mt-x"
