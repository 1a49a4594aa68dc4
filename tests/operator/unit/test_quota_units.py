"""Quota arithmetic (operator/quota.py): a shared group's GPUs are charged to its members'
namespaces by token share, and a newly placed task whose namespace cannot cover it waits."""
from __future__ import annotations

import asyncio

import pytest

from muxtune.operator import quota
from muxtune.operator.memory import Parallelism
from muxtune.operator.placement import GroupPlan, TaskRequest, TaskShape


def req(ns, name, batch=8, seq=512) -> TaskRequest:
    return TaskRequest(ns, name, "builtin:tiny-llama", TaskShape(batch_size=batch, max_seq_len=seq), share=True)


def gplan(members, gpus=1, tenancy=None) -> GroupPlan:
    return GroupPlan(name="mt-g", namespace="muxtune-system", base_model="builtin:tiny-llama", tenancy=tenancy,
                     parallelism=Parallelism(tp=gpus), gpu_product="", gpu_memory_mib=80000, members=tuple(members),
                     memory_per_gpu_bytes=1, new=True, changed=True)


def rq(name, hard, used="0", key="requests.nvidia.com/gpu"):
    return {"metadata": {"name": name}, "spec": {"hard": {key: hard}}, "status": {"hard": {key: hard}, "used": {key: used}}}


def test_room_is_the_tightest_gpu_quota():
    assert quota.room([]) is None and quota.room([{"metadata": {"name": "cpu"}, "status": {"hard": {"cpu": "4"}}}]) is None
    r = quota.room([rq("wide", "8", "1"), rq("tight", "2", "1", key="nvidia.com/gpu")])
    assert (r.free, r.quota, r.hard) == (1, "tight", 2)
    assert quota.room([rq("zero", "0")]).free == 0


def test_shares_follow_tokens_and_only_shared_groups_are_charged():
    reqs = {t.key: t for t in (req("a", "x", 8, 512), req("b", "y", 8, 1536), req("a", "solo"))}
    got = quota.charges([gplan(["a/x", "b/y"], gpus=2), gplan(["a/solo"], tenancy="a")], reqs)
    assert got == pytest.approx({"a": 0.5, "b": 1.5})  # 4096 vs 12288 tokens of 2 GPUs; a's own group: its pods


CASES = [  # (quota of team-a, members, new, expected waiting) -- every one is a bypass attempt or a legal fit
    ("0", ["team-a/t"], {"team-a/t"}, {"team-a/t"}),  # the only sharer, zero quota
    ("0", ["team-a/t", "team-b/u"], {"team-a/t"}, {"team-a/t"}),  # a fraction of a GPU is still GPU
    ("1", ["team-a/t", "team-a/t2"], {"team-a/t2"}, set()),  # 1 GPU of 1 free: fits
    (("1", "1"), ["team-a/t"], {"team-a/t"}, {"team-a/t"}),  # quota already used by its own pods
]


@pytest.mark.parametrize("hard,members,new,waiting", CASES)
def test_a_new_shared_task_over_its_namespaces_quota_waits(hard, members, new, waiting):
    hard, used = (hard, "0") if isinstance(hard, str) else hard
    reqs = {k: req(*k.split("/")) for k in members}
    rooms = {"team-a": quota.room([rq("gpus", hard, used)]), "team-b": None}
    out = quota.over_quota([gplan(members)], reqs, new, rooms)
    assert {u.task for u in out} == waiting
    assert all(u.reason == "QuotaExceeded" and "ResourceQuota gpus" in u.message for u in out)


def test_running_members_are_not_evicted_but_the_replan_rechecks():
    """place_within_quota: reads quotas, re-plans without the waiting task, and checks the new plan."""
    calls = []

    class Client:
        async def list(self, api, plural, ns):
            calls.append((plural, ns))
            return {"items": [rq("gpus", "0")] if ns == "team-a" else []}

    pending = [req("team-a", "new"), req("team-b", "b")]
    first = type("P", (), {"groups": (gplan(["team-a/new", "team-b/b", "team-a/old"]),)})()
    second = type("P", (), {"groups": (gplan(["team-b/b", "team-a/old"]),)})()
    plan, waiting = asyncio.run(quota.place_within_quota(Client(), first, pending, {"team-a/old": req("team-a", "old")},
                                                         lambda p: second))
    assert plan is second and [u.task for u in waiting] == ["team-a/new"]
    assert sorted(calls) == [("resourcequotas", "team-a"), ("resourcequotas", "team-b")]
