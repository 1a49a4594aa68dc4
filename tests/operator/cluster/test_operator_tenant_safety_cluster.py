"""Issue 19 against a real API server (kwok GPU nodes, the operator as the chart's namespaced
ServiceAccount): GPU quotas hold whether or not a task shares; every group gets a NetworkPolicy
with the right peers; serving is per tenant (each namespace's token Secret, the engine given only
digests, checked by the engine's own middleware: every cross-tenant request refused); output is
never an emptyDir. The engine itself does not run on kwok nodes: the serving requests go to the
real API handlers and middleware (over tests/conftest.py's stub engine), fed the tokens and
digests the operator wrote into the cluster. Counts are printed and asserted at the end."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tests.helpers import cluster as kh

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

COUNTS = {"cross_tenant_tried": 0, "cross_tenant_answered": 0, "quota_cases": 0, "quota_bypassed": 0}


def _groups(info, kh, ns):
    return kh.kjson(info, "get", "backbonegroups", "-n", ns)["items"]


def _secret(info, kh, ns, name, key):
    return base64.b64decode(kh.kjson(info, "get", "secret", name, "-n", ns)["data"][key]).decode()


def _conditions(info, kh, ns, name):
    st = kh.kjson(info, "get", "finetunetask", name, "-n", ns).get("status") or {}
    return {c.get("reason"): c for c in st.get("conditions") or []}, st


def _peers(rule):
    return sorted(v for p in rule["from"] for e in (p.get("namespaceSelector") or {}).get("matchExpressions", [])
                  for v in e["values"])


def _serving(kh, name, ns, share):
    t = kh.task_manifest(name, ns, data=f"sets/{name}.jsonl", share=share)
    t["spec"]["serving"] = {"enabled": True}
    return t


def test_every_group_is_fenced_and_serving_is_per_tenant(operator_env, tenant_api, tmp_path):
    COUNTS.update(cross_tenant_tried=0, cross_tenant_answered=0)  # this test's own count
    info, a, b, system = operator_env["info"], operator_env["a"], operator_env["b"], operator_env["system"]
    # the sharers first (under opt-in a sharer would rather join its own namespace's group), then
    # one task per namespace that does not share: three groups, two of them single-namespace
    kh.apply(info, _serving(kh, "a-task", a, True), _serving(kh, "b-secret", b, True))
    kh.wait_for(lambda: [g for g in _groups(info, kh, system) if len(g["spec"]["tasks"]) == 2], 60,
                what="the shared group")
    kh.apply(info, _serving(kh, "a-solo", a, False), kh.task_manifest("b-quiet", b, data="sets/q.jsonl"))

    def placed():
        shared = [g for g in _groups(info, kh, system) if len(g["spec"]["tasks"]) == 2]
        single = [g for ns in (a, b) for g in _groups(info, kh, ns)]
        return (shared, single) if shared and len(single) == 2 else None

    (shared,), singles = kh.wait_for(placed, 90, what="one shared and two single-namespace groups")
    # every group, shared or not, serving or not, has its NetworkPolicy with the right peers
    for g in [shared, *singles]:
        ns, name = g["metadata"]["namespace"], g["metadata"]["name"]
        members = sorted({t["namespace"] for t in g["spec"]["tasks"]})
        pol = kh.wait_for(lambda ns=ns, name=name: kh.kjson(info, "get", "networkpolicy", name, "-n", ns), 30,
                          what=f"NetworkPolicy {ns}/{name}")
        own, serving, metrics = pol["spec"]["ingress"]
        assert _peers(serving) == members and serving["ports"][0]["port"] == 8000
        assert _peers(metrics) == [system] and metrics["ports"][0]["port"] == 9400  # the operator's namespace
        assert pol["spec"]["podSelector"]["matchLabels"]["muxtune.io/group"] == name
    # output is persistent (the fixture's host path), never an emptyDir
    pod = kh.wait_for(lambda: (kh.kjson(info, "get", "pods", "-n", system, "-l",
                                        f"muxtune.io/group={shared['metadata']['name']}")["items"] or [None])[0], 60,
                      what="the shared group's pod")
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "hostPath" in vols["output"] and "serving-tokens" in vols

    # tokens: in each tenant's namespace; the engine gets only digests
    tok = {ns: kh.wait_for(lambda ns=ns: _secret(info, kh, ns, "muxtune-serving-token", "token"), 30,
                           what=f"{ns}'s serving token") for ns in (a, b)}
    digests = _secret(info, kh, system, f"{shared['metadata']['name']}-serving-tokens", "tokens.json")
    assert tok[a] not in digests and tok[b] not in digests and sorted(json.loads(digests).values()) == [a, b]
    info.kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice", "-n", a)
    can = info.kubectl("auth", "can-i", "get", "secret/muxtune-serving-token", "-n", b, "--as", "alice", check=False)
    assert can.stdout.strip() == "no"  # alice (edit in a) cannot read b's token
    can = info.kubectl("auth", "can-i", "get", "secret/muxtune-serving-token", "-n", a, "--as", "alice", check=False)
    assert can.stdout.strip() == "yes"

    f = tmp_path / "tokens.json"
    f.write_text(digests)
    models = [f"{a}/a-task", f"{b}/b-secret"]
    asyncio.run(_cross_tenant_requests(lambda: tenant_api(models, f), tok, a, b))
    info.kubectl("delete", "ftt", "a-task", "a-solo", "-n", a)
    info.kubectl("delete", "ftt", "b-secret", "b-quiet", "-n", b)
    kh.wait_for(lambda: not any(_groups(info, kh, ns) for ns in (a, b, system)), 60, what="the groups torn down")
    print(f"cross-tenant requests tried: {COUNTS['cross_tenant_tried']}, answered: {COUNTS['cross_tenant_answered']}")
    assert COUNTS["cross_tenant_tried"] >= 13 and COUNTS["cross_tenant_answered"] == 0


async def _cross_tenant_requests(make_client, tok, a, b):
    """Every request here speaks for the wrong namespace (or none): none may be answered."""
    own_ok = 0
    async with make_client() as c:  # made inside the running loop
        for caller, other in ((a, b), (b, a)):
            hdr = {"Authorization": f"Bearer {tok[caller]}"}
            victim = f"{other}/{'b-secret' if other == b else 'a-task'}"
            for method, path, body in (("POST", "/v1/completions", {"model": victim, "prompt": [1], "max_tokens": 1}),
                                       ("POST", "/v1/chat/completions",
                                        {"model": victim, "messages": [{"role": "user", "content": "x"}]}),
                                       ("GET", f"/v1/models/{victim}", None), ("GET", "/metrics", None)):
                async with c.request(method, path, headers=hdr, json=body) as r:
                    COUNTS["cross_tenant_tried"] += 1
                    COUNTS["cross_tenant_answered"] += r.status not in (401, 404)
            async with c.get("/v1/models", headers=hdr) as r:
                COUNTS["cross_tenant_tried"] += 1
                ids = [m["id"] for m in (await r.json())["data"]]
                COUNTS["cross_tenant_answered"] += any(i.startswith(other + "/") for i in ids)
                own_ok += any(i.startswith(caller + "/") for i in ids)
        for hdr in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {tok[a]}"}):
            async with c.post("/v1/completions", headers=hdr, json={"model": f"{a}/a-task", "prompt": [1]}) as r:
                COUNTS["cross_tenant_tried"] += 1
                COUNTS["cross_tenant_answered"] += r.status != 401
        async with c.post("/v1/completions", headers={"Authorization": f"Bearer {tok[a]}"},
                          json={"model": f"{a}/a-task", "prompt": [1], "max_tokens": 1}) as r:
            assert r.status == 429  # its own adapter reaches the engine (the stub's answer)
    assert own_ok == 2


def test_gpu_quota_holds_whether_or_not_a_task_shares(operator_env):
    COUNTS.update(quota_cases=0, quota_bypassed=0)  # this test's own count
    info, a, b, system = operator_env["info"], operator_env["a"], operator_env["b"], operator_env["system"]
    info.kubectl("create", "quota", "no-gpus", "--hard=requests.nvidia.com/gpu=0", "-n", a)
    try:
        # 1. a plain task: the API server refuses its pod (its group's pods run in its namespace)
        kh.apply(info, kh.task_manifest("q-plain", a, data="sets/p.jsonl"))
        conds, st = kh.wait_for(lambda: (lambda c: c if "PodCreationRefused" in c[0] else None)(
            _conditions(info, kh, a, "q-plain")), 60, what="the plain task refused")
        _count_quota_case(info, kh, a, "q-plain", system)
        # 2. the only sharer, 3. beside another namespace's sharer: both wait, naming the quota
        kh.apply(info, kh.task_manifest("q-solo", a, data="sets/s.jsonl", share=True))
        kh.apply(info, kh.task_manifest("q-pair", a, data="sets/p2.jsonl", share=True),
                 kh.task_manifest("q-other", b, data="sets/o.jsonl", share=True))
        for name in ("q-solo", "q-pair"):
            conds, st = kh.wait_for(lambda n=name: (lambda c: c if "QuotaExceeded" in c[0] else None)(
                _conditions(info, kh, a, n)), 60, what=f"{name} waiting on the quota")
            assert "ResourceQuota no-gpus" in conds["QuotaExceeded"]["message"]
        kh.wait_for(lambda: any(t["name"] == "q-other" for g in _groups(info, kh, system) for t in g["spec"]["tasks"]),
                    60, what="team-b's sharer placed")
        for name in ("q-solo", "q-pair"):
            _count_quota_case(info, kh, a, name, system)
    finally:
        info.kubectl("delete", "quota", "no-gpus", "-n", a)
    # 4. the quota raised: the waiting sharer is placed
    kh.wait_for(lambda: any(t["name"] == "q-solo" for g in _groups(info, kh, system) for t in g["spec"]["tasks"]),
                60, what="the sharer placed once the quota is gone")
    info.kubectl("delete", "ftt", "q-plain", "q-solo", "q-pair", "-n", a)
    info.kubectl("delete", "ftt", "q-other", "-n", b)
    print(f"quota cases tried: {COUNTS['quota_cases']}, bypassed: {COUNTS['quota_bypassed']}")
    assert COUNTS["quota_cases"] == 3 and COUNTS["quota_bypassed"] == 0


def _count_quota_case(info, kh, ns, name, system):
    """Bypassed: the task is a member of a group whose pod holds a GPU."""
    COUNTS["quota_cases"] += 1
    for gns in (ns, system):
        for g in _groups(info, kh, gns):
            if any(t["namespace"] == ns and t["name"] == name for t in g["spec"]["tasks"]):
                pods = kh.kjson(info, "get", "pods", "-n", gns, "-l", f"muxtune.io/group={g['metadata']['name']}")
                COUNTS["quota_bypassed"] += bool(pods["items"])


def test_gpu_quota_of_a_namespaces_kueue_queue_holds_for_sharers(operator_env, kueue_cluster):
    """Kueue never sees a shared group (its pods run in the operator's namespace, unqueued): the
    operator charges the sharer's share to the ClusterQueue its namespace's LocalQueue points to."""
    from muxtune.devcluster import kueue_objects as ko

    COUNTS.update(quota_cases=0, quota_bypassed=0)
    info, a, system = operator_env["info"], operator_env["a"], operator_env["system"]
    queue = f"kq-{a}"[-40:]
    kh.apply(info, *ko.queue_objects(queue, a, {"nvidia.com/gpu": 0}))
    try:
        kh.wait_for(lambda: (ko.condition(kh.kjson(info, "get", f"clusterqueues.kueue.x-k8s.io/{queue}"), "Active")
                             or {}).get("status") == "True", 60, what="ClusterQueue active")
        kh.apply(info, kh.task_manifest("kq-sharer", a, data="sets/k.jsonl", share=True))
        conds, _ = kh.wait_for(lambda: (lambda c: c if "QuotaExceeded" in c[0] else None)(
            _conditions(info, kh, a, "kq-sharer")), 60, what="the sharer waiting on its queue's quota")
        assert f"ClusterQueue {queue}: 0 GPU(s), 0 free" in conds["QuotaExceeded"]["message"], conds
        _count_quota_case(info, kh, a, "kq-sharer", system)
        # the queue given one GPU: the share fits, the sharer is placed in a shared group
        kh.apply(info, ko.cluster_queue(queue, queue, {"nvidia.com/gpu": 1}))
        kh.wait_for(lambda: any(t["name"] == "kq-sharer" for g in _groups(info, kh, system) for t in g["spec"]["tasks"]),
                    60, what="the sharer placed once its queue has a GPU")
    finally:
        info.kubectl("delete", "ftt", "kq-sharer", "-n", a, "--ignore-not-found", check=False)
        info.kubectl("delete", "localqueue.kueue.x-k8s.io", queue, "-n", a, "--ignore-not-found", check=False)
        info.kubectl("delete", f"clusterqueue.kueue.x-k8s.io/{queue}", f"resourceflavor.kueue.x-k8s.io/{queue}",
                     "--ignore-not-found", "--wait=false", check=False)
    print(f"Kueue quota cases tried: {COUNTS['quota_cases']}, bypassed: {COUNTS['quota_bypassed']}")
    assert COUNTS["quota_cases"] == 1 and COUNTS["quota_bypassed"] == 0
