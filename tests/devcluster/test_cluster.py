"""The local control plane is a real one: versioned apiserver, kube-scheduler
binding GPU pods to kwok nodes, RBAC on ServiceAccount tokens, garbage collection."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from muxtune.devcluster import build, cluster
from muxtune.devcluster.cluster import ClusterInfo, KubectlError

pytest_plugins = ["muxtune.devcluster.fixture"]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _json(info: ClusterInfo, *args: str) -> dict:
    return json.loads(info.kubectl(*args, "-o", "json").stdout)


def _pod(name: str, gpus: int, namespace: str = "default") -> str:
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "containers": [{
                "name": "trainer",
                "image": "registry.invalid/muxtune/engine:test",  # never pulled: kwok plays the kubelet
                "resources": {"limits": {"nvidia.com/gpu": str(gpus), "cpu": "1", "memory": "1Gi"}},
            }],
        },
    })


@pytest.fixture
def ns(kube_cluster: ClusterInfo):
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube_cluster.kubectl("create", "namespace", name)
    cluster.wait_for_default_service_account(kube_cluster, name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false")


def test_version_is_the_real_one(kube_cluster: ClusterInfo) -> None:
    assert kube_cluster.version == build.KUBERNETES_VERSION
    v = json.loads(kube_cluster.kubectl("get", "--raw", "/version").stdout)
    assert v["gitVersion"] == build.KUBERNETES_VERSION
    major, minor = build.KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    assert (v["major"], v["minor"]) == (major, minor)
    client = json.loads(kube_cluster.kubectl("version", "--client", "-o", "json").stdout)["clientVersion"]
    assert client["gitVersion"] == build.KUBERNETES_VERSION


def test_gpu_nodes_ready_with_gpu_allocatable(kube_cluster: ClusterInfo) -> None:
    assert kube_cluster.gpu_nodes
    nodes = {n["metadata"]["name"]: n for n in _json(kube_cluster, "get", "nodes")["items"]}
    for name in kube_cluster.gpu_nodes:
        node = nodes[name]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["status"]["conditions"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert labels["nvidia.com/gpu.memory"] == "81559"
        assert labels["nvidia.com/gpu.count"] == "8"
        assert not node["spec"].get("taints"), node["spec"]


def test_gpu_pod_is_scheduled_onto_a_kwok_node_and_runs(kube_cluster: ClusterInfo, ns: str) -> None:
    kube_cluster.kubectl("create", "-f", "-", input=_pod("one-gpu", 1, ns))
    kube_cluster.kubectl("wait", "-n", ns, "pod/one-gpu", "--for=jsonpath={.status.phase}=Running", "--timeout=60s", timeout=90)
    pod = _json(kube_cluster, "get", "-n", ns, "pod/one-gpu")
    assert pod["spec"]["nodeName"] in kube_cluster.gpu_nodes
    conds = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conds["PodScheduled"] == "True" and conds["Ready"] == "True"
    # bound by the real kube-scheduler (not by nodeName in the spec)
    events = _json(kube_cluster, "get", "events", "-n", ns, "--field-selector", "involvedObject.name=one-gpu,reason=Scheduled")["items"]
    assert events, "no Scheduled event"
    assert (events[0].get("reportingComponent") or events[0]["source"].get("component")) == "default-scheduler"
    # deleting a pod on a kwok node completes (kwok confirms the deletion like a kubelet)
    kube_cluster.kubectl("delete", "-n", ns, "pod/one-gpu", "--timeout=60s", timeout=90)


def test_pod_needing_more_gpus_than_any_node_stays_pending(kube_cluster: ClusterInfo, ns: str) -> None:
    kube_cluster.kubectl("create", "-f", "-", input=_pod("too-many", 9, ns))
    kube_cluster.kubectl(
        "wait", "-n", ns, "pod/too-many",
        "--for=jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].reason}=Unschedulable",
        "--timeout=60s", timeout=90,
    )
    pod = _json(kube_cluster, "get", "-n", ns, "pod/too-many")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")
    cond = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond


def test_service_account_token_authenticates_and_rbac_denies(kube_cluster: ClusterInfo, ns: str) -> None:
    info = kube_cluster
    info.kubectl("create", "serviceaccount", "reader", "-n", ns)
    info.kubectl("create", "role", "pod-reader", "-n", ns, "--verb=get,list,watch", "--resource=pods")
    info.kubectl("create", "rolebinding", "reader", "-n", ns, "--role=pod-reader", f"--serviceaccount={ns}:reader")
    kc = cluster.service_account_kubeconfig(info, ns, "reader")

    who = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kc).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"

    # RBAC bindings propagate through the authorizer's informer: allow a moment
    deadline = time.monotonic() + 30
    while True:
        p = cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False)
        if p.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert p.returncode == 0, p.stderr
    for args in (("get", "secrets", "-n", ns), ("get", "pods", "-n", "default"), ("create", "configmap", "x", "-n", ns)):
        with pytest.raises(KubectlError) as e:
            cluster.kubectl(*args, kubeconfig=kc)
        assert "forbidden" in e.value.stderr.lower() and f"system:serviceaccount:{ns}:reader" in e.value.stderr
    assert cluster.kubectl("auth", "can-i", "create", "pods", "-n", ns, kubeconfig=kc, check=False).stdout.strip() == "no"

    # a forged token is rejected outright
    bad = kc.with_name("bad.kubeconfig")
    cfg = json.loads(kc.read_text())
    cfg["users"][0]["user"]["token"] = cfg["users"][0]["user"]["token"][:-4] + "AAAA"
    bad.write_text(json.dumps(cfg))
    p = cluster.kubectl("get", "pods", "-n", ns, kubeconfig=bad, check=False)
    assert p.returncode != 0 and "Unauthorized" in p.stderr, p.stderr


def test_owner_reference_cascade_deletion(kube_cluster: ClusterInfo, ns: str) -> None:
    info = kube_cluster
    info.kubectl("create", "configmap", "owner", "-n", ns)
    uid = _json(info, "get", "configmap/owner", "-n", ns)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": ns,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    info.kubectl("create", "-f", "-", input=json.dumps(child))
    info.kubectl("create", "-f", "-", input=_pod("owned-pod", 1, ns).replace(
        '"namespace": "%s"}' % ns,
        '"namespace": "%s", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "%s"}]}' % (ns, uid),
    ))
    assert _json(info, "get", "pod/owned-pod", "-n", ns)["metadata"]["ownerReferences"][0]["uid"] == uid
    info.kubectl("delete", "configmap/owner", "-n", ns)
    info.kubectl("wait", "--for=delete", "configmap/child", "pod/owned-pod", "-n", ns, "--timeout=60s", timeout=90)


def test_up_reuses_the_running_cluster(kube_cluster: ClusterInfo) -> None:
    t = time.monotonic()
    again = cluster.up(kube_cluster.state_dir, gpu_nodes=len(kube_cluster.gpu_nodes))
    assert time.monotonic() - t < 15
    assert again.server == kube_cluster.server and again.pids == kube_cluster.pids
    st = cluster.status(kube_cluster.state_dir)
    assert st["running"] and st["ready"], st
