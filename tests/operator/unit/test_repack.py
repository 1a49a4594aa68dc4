"""Repacking half-empty groups (operator/repack.py): whole groups drained into groups of the same class
with room, at their budgets; bounded churn."""
from __future__ import annotations

from muxtune.api.basemodel import Architecture
from muxtune.operator import memory as M
from muxtune.operator import planner as P
from muxtune.operator.repack import Move, plan_repack

LLAMA7B = Architecture(parameters=6_738_000_000, layers=32, hidden_size=4096, num_attention_heads=32, vocab_size=32000)
MODELS = {"llama7b": LLAMA7B}


def _task(name, ns="a"):
    return P.TaskRequest(ns, name, "model:llama7b", shape=M.TaskShape(batch_size=4, max_seq_len=512))


def _group(name, members, ns="a", budget=4096):
    return P.GroupState(name, ns, "model:llama7b", ns, M.Parallelism(), 81920, "H100", members=tuple(members),
                        token_budget=budget)


def test_the_smaller_group_is_drained_whole_into_the_other():
    g1 = _group("g1", [_task(f"x{i}") for i in range(5)])
    g2 = _group("g2", [_task(f"y{i}") for i in range(2)])
    moves = plan_repack([g1, g2], MODELS)
    assert moves == (Move("a/y0", "g2", "g1"), Move("a/y1", "g2", "g1"))
    # the receiver, with its new members, still fits its GPU at its own budget
    mems = [M.task_memory(t.shape, LLAMA7B) for t in [*g1.members, *g2.members]]
    assert M.group_memory_per_gpu(LLAMA7B, mems, M.Parallelism(), 81920 * M.MiB, token_budget=4096) <= 81920 * M.MiB


def test_tenancy_task_count_and_churn_bound_the_moves():
    # another namespace's group never takes them
    assert plan_repack([_group("g1", [_task("x")]), _group("g2", [_task("y", "b")], ns="b")], MODELS) == ()
    # a group full by task count takes nothing; a partial drain is never proposed
    full = _group("g1", [_task(f"x{i}") for i in range(32)])
    assert plan_repack([full, _group("g2", [_task("y0"), _task("y1")])], MODELS) == ()
    three = _group("g1", [_task(f"x{i}") for i in range(30)])
    assert plan_repack([three, _group("g2", [_task(f"y{i}") for i in range(3)])], MODELS) == ()
    # at most max_moves tasks per pass; a receiver is not drained in the same pass
    groups = [_group(f"g{i}", [_task(f"t{i}-{j}") for j in range(3)]) for i in range(4)]
    moves = plan_repack(groups, MODELS, max_moves=4)
    assert len(moves) == 3 and len({m.source for m in moves}) == 1
    assert not {m.source for m in moves} & {m.target for m in moves}
    every = plan_repack(groups, MODELS, max_moves=100)  # all twelve tasks fit one group: three drained
    assert len(every) == 9 and {m.target for m in every} == {"g1"}
