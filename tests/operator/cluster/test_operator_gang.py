"""Issue 8 in the cluster: a BackboneGroup of two pods is a gang, against the real API server, the real
kube-scheduler, kwok GPU nodes (2 x 8 GPUs) and, for admission, the real Kueue (plain-pod groups).

The BaseModels here give the planner size figures (the engine would run the built-in tiny model) that
no single node can hold: one needs data parallelism over two whole nodes (dp=2 x pp=8), the other
two one-GPU replicas (dp=2). No engine runs in these pods (kwok plays the kubelet); the end-to-end
run of a two-pod group's real command lines is in test_operator_e2e_dp.py.
"""
from __future__ import annotations

import time
import uuid

import pytest

from tests.helpers.cluster import TWO_REPLICAS, WHOLE_NODES, apply, basemodel, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]

def ftt(info, ns, name):
    return kjson(info, "get", "finetunetask", name, "-n", ns)


def running_reason(info, ns, name):
    st = ftt(info, ns, name).get("status") or {}
    c = {c["type"]: c for c in st.get("conditions") or []}.get("Running", {})
    return st.get("phase"), c.get("reason"), c.get("message", "")


def group_pods(info, ns, group):
    return sorted(kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"],
                  key=lambda p: p["metadata"]["name"])


def live(pods):
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def running_gang(info, ns, group, n=2):
    pods = live(group_pods(info, ns, group))
    ok = len(pods) == n and all(p["spec"].get("nodeName") and p["status"].get("phase") == "Running" for p in pods)
    return pods if ok else None


def events(info, ns, name):
    return {e["reason"] for e in kjson(info, "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")["items"]}


def test_two_pod_group_waits_for_the_whole_gang_and_restarts_whole(operator_env):
    info, ns = operator_env["info"], operator_env["a"]
    bm = f"whole-{ns}"
    task = task_manifest("gang", ns, base=f"model:{bm}", batch=8, seq=4096, steps=1000, priority=100)  # speed band: whole steps
    apply(info, basemodel(bm, ns, WHOLE_NODES), task)
    group = wait_for(lambda: (ftt(info, ns, "gang").get("status") or {}).get("group"), 180, what="placed")
    g = kjson(info, "get", "backbonegroup", group, "-n", ns)
    assert g["spec"]["parallelism"] == {"dp": 2, "tp": 1, "pp": 8} and g["spec"]["gpusPerPod"] == 8
    pods = wait_for(lambda: running_gang(info, ns, group), 180, what="both pods bound and running")
    assert {p["spec"]["nodeName"] for p in pods} == set(info.gpu_nodes)  # 8 GPUs each: one node each
    for rank, p in enumerate(pods):
        c = p["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("2", "8", str(rank))
        assert env["PET_MASTER_ADDR"] == f"{group}-0.{group}.{ns}.svc" and env["PET_MASTER_PORT"] == "29500"
        assert c["args"][-6:] == ["--dp", "2", "--tp", "1", "--pp", "8"] and p["spec"]["restartPolicy"] == "Never"
        assert p["spec"]["subdomain"] == group and p["spec"]["hostname"] == f"{group}-{rank}"
    svc = kjson(info, "get", "service", group, "-n", ns)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    netpol = kjson(info, "get", "networkpolicy", group, "-n", ns)  # torch.distributed authenticates nobody
    assert netpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["muxtune.io/group"] == group
    st = wait_for(lambda: (s := kjson(info, "get", "backbonegroup", group, "-n", ns).get("status") or {})
                  .get("podsReady") == "2/2" and s, 60, what="group status 2/2 ready")
    assert st["layout"] == "dp2 x tp1 x pp8" and st["gpus"] == 16 and st["phase"] == "Running" and st["restarts"] == 0
    assert "2/2" in info.kubectl("get", "bbg", group, "-n", ns).stdout

    # a lost pod restarts the whole group: pod 0 is recreated too
    uids = {p["metadata"]["uid"] for p in pods}
    info.kubectl("delete", "pod", f"{group}-1", "-n", ns, "--wait=false")

    def restarted():
        pods = running_gang(info, ns, group)
        return pods if pods and not uids & {p["metadata"]["uid"] for p in pods} else None

    wait_for(restarted, 120, what="both pods recreated")
    g = kjson(info, "get", "backbonegroup", group, "-n", ns)
    assert g["metadata"]["annotations"]["muxtune.io/restarts"] == "1"
    why = g["metadata"]["annotations"]["muxtune.io/restart-reason"]
    assert f"pod {group}-1 was deleted" in why or "1 of the group's 2 pods are gone" in why, why
    assert "GroupRestarting" in events(info, ns, "gang")

    # no pod of a group until all fit: with one node cordoned, a restart leaves room for one pod only
    pods = running_gang(info, ns, group)
    other = pods[1]["spec"]["nodeName"]
    info.kubectl("cordon", other)
    try:
        info.kubectl("delete", "pod", f"{group}-1", "-n", ns, "--wait=false")
        phase, reason, msg = wait_for(lambda: (r := running_reason(info, ns, "gang"))[1] == "WaitingForGang" and r,
                                      120, what="WaitingForGang")
        assert phase == "Placed" and "all 2 pods (8 GPU(s) each)" in msg, msg
        wait_for(lambda: not group_pods(info, ns, group), 60, what="the old pods gone")
        for _ in range(10):  # and none created while they do not all fit
            time.sleep(0.5)
            assert not group_pods(info, ns, group), "a pod of a gang that does not fit was created"
        cond = {c["type"]: c for c in kjson(info, "get", "backbonegroup", group, "-n", ns)["status"]["conditions"]}
        assert cond["Ready"]["reason"] == "WaitingForGang"
    finally:
        info.kubectl("uncordon", other)
    pods = wait_for(lambda: running_gang(info, ns, group), 120, what="the whole gang admitted together")
    created = sorted(p["metadata"]["creationTimestamp"] for p in pods)
    assert created[0][:16] == created[1][:16] or created[0] == created[1]  # in one pass (same minute at worst)
    assert kjson(info, "get", "backbonegroup", group, "-n", ns)["metadata"]["annotations"]["muxtune.io/restarts"] == "2"

    info.kubectl("delete", "ftt", "gang", "-n", ns)
    wait_for(lambda: not group_pods(info, ns, group), 60, what="group torn down")
    info.kubectl("delete", "basemodel", bm)
    log = operator_env["op"].log_text()
    assert "reconcile pass failed" not in log and "write failed" not in log, log[-3000:]


def test_kueue_admits_a_two_pod_group_whole_and_restarts_it_through_its_workload(operator_env, kueue_cluster):
    from muxtune.devcluster import kueue_objects as ko

    info, ns = operator_env["info"], operator_env["b"]
    info.kubectl("label", "namespace", ns, "kueue-managed=true", "--overwrite")
    queue, bm = f"q-{uuid.uuid4().hex[:6]}", f"two-{ns}"
    quota = {"cpu": 64, "memory": "256Gi", "nvidia.com/gpu": 1}  # one pod's GPU: the group needs two
    apply(info, *ko.queue_objects(queue, ns, quota))
    wait_for(lambda: (ko.condition(kjson(info, "get", f"clusterqueues.kueue.x-k8s.io/{queue}"), "Active") or {})
             .get("status") == "True", 60, what="ClusterQueue active")
    task = task_manifest("queued", ns, base=f"model:{bm}", batch=4, seq=8192, steps=1000, priority=100,
                         labels={ko.QUEUE_NAME_LABEL: queue})  # speed band: its whole step needs two pods
    apply(info, basemodel(bm, ns, TWO_REPLICAS), task)
    try:
        group = wait_for(lambda: (ftt(info, ns, "queued").get("status") or {}).get("group"), 120, what="placed")
        g = kjson(info, "get", "backbonegroup", group, "-n", ns)
        assert g["spec"]["parallelism"] == {"dp": 2, "tp": 1, "pp": 1} and g["spec"]["gpusPerPod"] == 1
        pods = wait_for(lambda: len(p := group_pods(info, ns, group)) == 2 and p, 60, what="both pods created")
        for p in pods:  # Kueue's plain-pod group: one Workload for both
            assert p["metadata"]["labels"][ko.QUEUE_NAME_LABEL] == queue
            assert p["metadata"]["labels"][ko.POD_GROUP_NAME_LABEL] == group
            assert p["metadata"]["annotations"][ko.POD_GROUP_TOTAL_COUNT_ANNOTATION] == "2"
            assert ko.is_gated(p) and not p["spec"].get("nodeName")
        # quota for one pod only: both stay gated, and the tasks say why in Kueue's words
        phase, reason, msg = wait_for(
            lambda: (r := running_reason(info, ns, "queued"))[1] == "WaitingForAdmission" and "quota" in r[2] and r,
            120, what="WaitingForAdmission with Kueue's reason")
        assert phase == "Placed" and "nvidia.com/gpu" in msg, msg
        wl = kjson(info, "get", f"{ko.WORKLOAD_RESOURCE}/{group}", "-n", ns)
        assert sum(ps["count"] for ps in wl["spec"]["podSets"]) == 2
        assert all(ko.is_gated(p) for p in group_pods(info, ns, group))
        cond = {c["type"]: c for c in kjson(info, "get", "backbonegroup", group, "-n", ns)["status"]["conditions"]}
        assert cond["Ready"]["reason"] == "WaitingForAdmission"

        # quota for both: admitted whole
        apply(info, ko.cluster_queue(queue, queue, {**quota, "nvidia.com/gpu": 2}))
        pods = wait_for(lambda: running_gang(info, ns, group), 120, what="both pods admitted and running")
        assert not any(ko.is_gated(p) for p in pods)
        wait_for(lambda: running_reason(info, ns, "queued")[1] not in ("WaitingForAdmission", None), 60,
                 what="no longer waiting for admission")

        # a lost pod: the Workload goes first (else Kueue's finalizer keeps the pods), then all pods
        old = {p["metadata"]["uid"] for p in pods}
        old_wl = kjson(info, "get", f"{ko.WORKLOAD_RESOURCE}/{group}", "-n", ns)["metadata"]["uid"]
        info.kubectl("delete", "pod", f"{group}-1", "-n", ns, "--wait=false")

        def readmitted():
            pods = running_gang(info, ns, group)
            if not pods or old & {p["metadata"]["uid"] for p in pods}:
                return None
            wl = kjson(info, "get", f"{ko.WORKLOAD_RESOURCE}/{group}", "-n", ns)
            admitted = (ko.condition(wl, "Admitted") or {}).get("status") == "True"
            return wl if admitted and wl["metadata"]["uid"] != old_wl else None

        wait_for(readmitted, 180, what="a new Workload admitted with two new pods")
        g = kjson(info, "get", "backbonegroup", group, "-n", ns)
        assert g["metadata"]["annotations"]["muxtune.io/restarts"] == "1"
        assert "GroupRestarting" in events(info, ns, "queued")

        # teardown deletes the Workload first, so the pods (and the namespace) can go
        info.kubectl("delete", "ftt", "queued", "-n", ns)
        wait_for(lambda: not group_pods(info, ns, group), 90, what="pods gone with the group")
        assert info.kubectl("get", f"{ko.WORKLOAD_RESOURCE}/{group}", "-n", ns, check=False).returncode != 0
        log = operator_env["op"].log_text()
        assert "reconcile pass failed" not in log and "write failed" not in log, log[-3000:]
    finally:
        # never leave a pod group behind: its finalizers would keep the namespace from going
        info.kubectl("delete", ko.WORKLOAD_RESOURCE, "--all", "-n", ns, "--wait=false", check=False)
        info.kubectl("delete", "ftt", "--all", "-n", ns, "--wait=false", check=False)
        for ref in (f"clusterqueue/{queue}", f"resourceflavor/{queue}", f"basemodel/{bm}"):
            info.kubectl("delete", ref, "--wait=false", "--ignore-not-found", check=False)
