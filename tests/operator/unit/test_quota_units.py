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


def gplan(members, gpus=1, tenancy=None, gpu_fraction=1.0) -> GroupPlan:
    return GroupPlan(name="mt-g", namespace="muxtune-system", base_model="builtin:tiny-llama", tenancy=tenancy,
                     parallelism=Parallelism(tp=gpus), gpu_product="", gpu_memory_mib=80000, members=tuple(members),
                     memory_per_gpu_bytes=1, new=True, changed=True, gpu_fraction=gpu_fraction)


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


def test_a_gpu_slice_is_charged_even_in_the_tenants_own_namespace():
    """A group on a time-sliced GPU runs its pod in the tenant's namespace, but the pod requests a
    nvidia.com/gpu.shared replica, which a nvidia.com/gpu quota does not count: the operator charges
    the slice (a quarter of a GPU here) or a zero-GPU namespace would train on one."""
    reqs = {t.key: t for t in (req("a", "x"), req("a", "y"))}
    sliced = gplan(["a/x", "a/y"], tenancy="a", gpu_fraction=0.25)
    assert quota.charges([sliced], reqs) == pytest.approx({"a": 0.25})
    (u,) = [o for o in quota.over_quota([sliced], reqs, {"a/y"}, {"a": quota.room([rq("gpus", "0")])})]
    assert u.task == "a/y" and u.reason == "QuotaExceeded" and "slice of a time-sliced GPU" in u.message
    assert not quota.over_quota([sliced], reqs, {"a/y"}, {"a": quota.room([rq("gpus", "1")])})


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
    assert sorted(c for c in calls if c[0] == "resourcequotas") == [("resourcequotas", "team-a"),
                                                                    ("resourcequotas", "team-b")]


def cq(name, nominal, reserved=0, used=0, gpu=True):
    res = [{"name": "cpu", "nominalQuota": "64"}] + ([{"name": "nvidia.com/gpu", "nominalQuota": str(nominal)}] if gpu else [])
    st = {field: [{"name": "f", "resources": [{"name": "nvidia.com/gpu", "total": str(v)}, {"name": "cpu", "total": "9"}]}]
          for field, v in (("flavorsReservation", reserved), ("flavorsUsage", used))}
    return {"metadata": {"name": name}, "spec": {"resourceGroups": [{"flavors": [{"name": "f", "resources": res}]}]},
            "status": st}


def lq(name, ns, cluster_queue):
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"clusterQueue": cluster_queue}}


def test_cluster_queue_room_is_nominal_gpus_less_reserved():
    assert quota.cluster_queue_room(cq("q", 4, reserved=3, used=1)) == quota.Room(1, "ClusterQueue q", 4)
    assert quota.cluster_queue_room(cq("q", 4)).free == 4
    assert quota.cluster_queue_room(cq("q", 4, gpu=False)) is None  # a queue without GPUs limits nothing here


def test_a_namespaces_queue_is_its_default_localqueue_else_all_of_them():
    assert quota.queues_of([lq("default", "a", "cq-d"), lq("other", "a", "cq-o")]) == ["cq-d"]
    assert quota.queues_of([lq("x", "a", "cq-x"), lq("y", "a", "cq-y")]) == ["cq-x", "cq-y"]
    assert quota.queues_of([]) == []


class KueueClient:
    """The API server's answers for ResourceQuotas, LocalQueues and ClusterQueues (404: no Kueue)."""

    def __init__(self, lqs: dict, cqs: list, kueue=True):
        self.lqs, self.cqs, self.kueue = lqs, cqs, kueue

    async def list(self, api, plural, ns=None):
        from muxtune.operator.kube import ApiError
        if plural == "resourcequotas":
            return {"items": []}
        if not self.kueue:
            raise ApiError(404, "the server could not find the requested resource", "GET", plural)
        return {"items": self.lqs.get(ns, []) if plural == "localqueues" else self.cqs}


def _place(client, members, pending_keys):
    reqs = {k: req(*k.split("/")) for k in members}
    pending = [reqs[k] for k in pending_keys]
    plan = type("P", (), {"groups": (gplan(members),)})()
    return asyncio.run(quota.place_within_quota(client, plan, pending,
                                                {k: v for k, v in reqs.items() if k not in pending_keys},
                                                lambda p: type("P", (), {"groups": (gplan([t.key for t in p]),)})()))


KUEUE_CASES = [  # (ClusterQueue GPUs nominal/reserved, members of a 1-GPU shared group, new, expected waiting)
    ((0, 0), ["a/t"], ["a/t"], {"a/t"}),  # the only sharer, zero GPU quota on its queue
    ((1, 1), ["a/t"], ["a/t"], {"a/t"}),  # the queue's GPU already admitted to Kueue workloads
    ((1, 0), ["a/t"], ["a/t"], set()),  # fits: 1 GPU free
    ((1, 0), ["a/t", "b/u"], ["a/t", "b/u"], set()),  # a and b on one queue: 0.5 + 0.5 GPU fit 1 free
    ((0, 0), ["a/t", "c/w"], ["c/w"], set()),  # c has no queue: only a (not new) is over
    ((2, 2), ["a/t", "b/u"], ["a/t"], {"a/t"}),  # b's running share counts too: nothing left for a
]


@pytest.mark.parametrize("cq_gpus,members,new,waiting", KUEUE_CASES)
def test_a_shared_task_over_its_queues_gpu_quota_waits_naming_the_cluster_queue(cq_gpus, members, new, waiting):
    lqs = {"a": [lq("default", "a", "cq")], "b": [lq("team", "b", "cq")]}
    _, out = _place(KueueClient(lqs, [cq("cq", *cq_gpus), cq("other", 9)]), members, new)
    assert {u.task for u in out} == waiting
    assert all(u.reason == "QuotaExceeded" and "ClusterQueue cq" in u.message for u in out)


def test_a_queue_is_charged_with_the_shares_of_all_its_namespaces():
    lqs = {"a": [lq("default", "a", "cq")], "b": [lq("team", "b", "cq")]}
    groups = [gplan(["a/t", "b/u"], gpus=2)]
    reqs = {k: req(*k.split("/")) for k in ("a/t", "b/u")}
    rooms = asyncio.run(quota.kueue_rooms(KueueClient(lqs, [cq("cq", 2, reserved=1)]), ["a", "b"]))
    assert rooms["a"][0].scope == frozenset({"a", "b"}) and rooms["a"][0].free == 1
    # each namespace alone (1 GPU) would fit the 1 free GPU; together (2 GPUs) they do not
    out = quota.over_quota(groups, reqs, {"a/t"}, rooms)
    assert [u.task for u in out] == ["a/t"] and "ClusterQueue cq: 2 GPU(s), 1 free" in out[0].message
    assert quota.over_quota(groups, reqs, {"a/t"}, {ns: [quota.Room(1, "ClusterQueue cq", 2)] for ns in "ab"}) == []


def test_without_kueue_only_resource_quotas_count():
    assert asyncio.run(quota.kueue_rooms(KueueClient({}, [], kueue=False), ["a"])) == {}
