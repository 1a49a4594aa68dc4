"""A real Kueue (built from the Go module proxy) gang-admits a plain-pod group on the dev cluster.

Real kube-apiserver calling Kueue's webhooks, Kueue's controllers, the real kube-scheduler and kwok
GPU nodes: a group of two pods, each asking for 4 GPUs, is one Workload; with quota for both Kueue
releases both pods and the scheduler binds them; with quota for one pod's GPUs neither is released
(all or nothing) until the quota is raised.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from muxtune.devcluster import build, cluster
from muxtune.devcluster import kueue as kueue_dc
from muxtune.devcluster import kueue_objects as ko
from muxtune.devcluster.cluster import ClusterInfo

pytest_plugins = ["muxtune.devcluster.fixture"]

# the first test here may build Kueue (~7 min cold on two idle cores, more on a busy machine)
# unless `muxtune dev-cluster build --kueue` ran before pytest: more room than the suite's 900 s
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2700)]

GPUS_PER_POD = 4


def _json(info: ClusterInfo, *args: str) -> dict:
    return json.loads(info.kubectl(*args, "-o", "json").stdout)


def _apply(info: ClusterInfo, *docs: dict) -> None:
    cluster.apply_manifests(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}), kubeconfig=info.kubeconfig)


def _wait_for(what: str, probe: Callable[[], tuple[bool, object]], diag: Callable[[], str], timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while True:
        ok, value = probe()
        if ok:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {value}\n{diag()}")
        time.sleep(0.5)


def _pod(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "backbone"}},
        "spec": {
            "containers": [{
                "name": "engine",
                "image": "registry.invalid/muxtune/engine:test",  # never pulled: kwok plays the kubelet
                "resources": {
                    "requests": {"nvidia.com/gpu": str(GPUS_PER_POD), "cpu": "1", "memory": "1Gi"},
                    "limits": {"nvidia.com/gpu": str(GPUS_PER_POD)},
                },
            }],
        },
    }


class Env:
    """A managed namespace plus the queue objects a test creates (removed afterwards)."""

    def __init__(self, info: ClusterInfo, ns: str) -> None:
        self.info, self.ns, self.cluster_scoped = info, ns, []

    def queue(self, gpus: int) -> str:
        name = f"q-{uuid.uuid4().hex[:6]}"
        objs = ko.queue_objects(name, self.ns, {"cpu": 16, "memory": "64Gi", "nvidia.com/gpu": gpus})
        _apply(self.info, *objs)
        self.cluster_scoped += [f"clusterqueue/{name}", f"resourceflavor/{name}"]
        # Kueue marks the ClusterQueue Active once it has seen its flavor
        _wait_for(f"ClusterQueue {name} Active", lambda: self._cq_active(name), self.diag)
        return name

    def _cq_active(self, name: str) -> tuple[bool, object]:
        cq = _json(self.info, "get", f"clusterqueues.kueue.x-k8s.io/{name}")
        c = ko.condition(cq, "Active")
        return bool(c and c["status"] == "True"), c

    def set_gpu_quota(self, queue: str, gpus: int) -> None:
        _apply(self.info, ko.cluster_queue(queue, queue, {"cpu": 16, "memory": "64Gi", "nvidia.com/gpu": gpus}))

    def create_group(self, queue: str, group: str, total: int = 2) -> list[str]:
        names = [f"{group}-{i}" for i in range(total)]
        pods = [ko.in_pod_group(_pod(n, self.ns), queue, group, total) for n in names]
        self.info.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))
        return names

    def pods(self, names: list[str]) -> list[dict]:
        items = {p["metadata"]["name"]: p for p in _json(self.info, "get", "pods", "-n", self.ns)["items"]}
        return [items[n] for n in names]

    def workloads(self) -> list[dict]:
        return _json(self.info, "get", ko.WORKLOAD_RESOURCE, "-n", self.ns)["items"]

    def workload(self, name: str) -> dict | None:
        return next((w for w in self.workloads() if w["metadata"]["name"] == name), None)

    def diag(self) -> str:
        pods = self.info.kubectl("get", "pods", "-n", self.ns, "-o", "wide", check=False).stdout
        wls = self.info.kubectl("get", "workloads.kueue.x-k8s.io", "-n", self.ns, "-o", "yaml", check=False).stdout
        return f"pods:\n{pods}\nworkloads:\n{wls[-4000:]}\nkueue log:\n{cluster._log_tail(self.info.state_dir, 'kueue', 20)}"


@pytest.fixture
def env(kueue_cluster: ClusterInfo) -> Iterator[Env]:
    ns = f"kq-{uuid.uuid4().hex[:8]}"
    _apply(kueue_cluster, ko.managed_namespace(ns))
    cluster.wait_for_default_service_account(kueue_cluster, ns)
    e = Env(kueue_cluster, ns)
    yield e
    # a pod group's pods keep Kueue's finalizer until their Workload goes, and namespace deletion
    # removes pods before anything else: delete the Workloads first or the namespace never goes
    kueue_cluster.kubectl("delete", ko.WORKLOAD_RESOURCE, "--all", "-n", ns, "--wait=false", check=False)
    kueue_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    for ref in e.cluster_scoped:
        kueue_cluster.kubectl("delete", ref, "--wait=false", "--ignore-not-found", check=False)


def _admitted(e: Env, group: str) -> tuple[bool, object]:
    wl = e.workload(group)
    c = wl and ko.condition(wl, "Admitted")
    return bool(c and c["status"] == "True"), (wl or {}).get("status")


def _running_on_gpu_nodes(e: Env, names: list[str]) -> tuple[bool, object]:
    pods = e.pods(names)
    states = [(p["status"].get("phase"), p["spec"].get("nodeName")) for p in pods]
    return all(ph == "Running" and node in e.info.gpu_nodes for ph, node in states), states


def test_default_build_leaves_kueue_out() -> None:
    # the plain cluster (make test's `muxtune dev-cluster build`, kube_cluster) never pays for Kueue
    assert "kueue" in build.BINARIES and "kueue" not in build.DEFAULT_BINARIES
    assert "kueue" not in build.missing_binaries()


def test_pod_group_metadata_is_added_to_a_copy() -> None:
    pod = _pod("p", "ns")
    member = ko.in_pod_group(pod, "lq", "grp", 3)
    assert member["metadata"]["labels"] == {"app": "backbone", ko.QUEUE_NAME_LABEL: "lq", ko.POD_GROUP_NAME_LABEL: "grp"}
    assert member["metadata"]["annotations"] == {ko.POD_GROUP_TOTAL_COUNT_ANNOTATION: "3"}
    assert pod["metadata"]["labels"] == {"app": "backbone"} and "annotations" not in pod["metadata"]
    with pytest.raises(ValueError):
        ko.pod_group_metadata("lq", "grp", 0)


def test_kueue_is_the_pinned_release_with_its_webhooks_registered(kueue_cluster: ClusterInfo) -> None:
    log = (kueue_cluster.state_dir / "logs" / "kueue.log").read_text()
    assert f'"gitVersion":"{build.KUEUE_VERSION}"' in log.replace(" ", "")
    crds = {c["metadata"]["name"]: c for c in _json(kueue_cluster, "get", "crd")["items"]}
    port = kueue_cluster.ports["kueue-webhook"]
    conv = crds["workloads.kueue.x-k8s.io"]["spec"]["conversion"]
    assert conv["strategy"] == "Webhook" and conv["webhook"]["clientConfig"]["url"] == f"https://127.0.0.1:{port}/convert"
    mwc = _json(kueue_cluster, "get", "mutatingwebhookconfiguration", kueue_dc.WEBHOOK_CONFIGS["MutatingWebhookConfiguration"])
    hooks = {w["name"]: w for w in mwc["webhooks"]}
    assert "mpod.kb.io" in hooks and "mjob.kb.io" not in hooks  # only the enabled integration's
    assert hooks["mpod.kb.io"]["clientConfig"]["url"] == f"https://127.0.0.1:{port}/mutate--v1-pod"
    assert hooks["mpod.kb.io"]["namespaceSelector"] == {"matchLabels": {"kueue-managed": "true"}}


def test_conversion_webhook_translates_between_api_versions(kueue_cluster: ClusterInfo) -> None:
    # v1beta1 is stored, v1beta2 served; cohortName (v1beta2) is cohort in v1beta1: without Kueue's
    # /convert the API server would drop the field instead of renaming it
    name = f"conv-{uuid.uuid4().hex[:6]}"
    cq = ko.cluster_queue(name, "none", {"cpu": 1})
    cq["spec"]["cohortName"] = "team-a"
    _apply(kueue_cluster, cq)
    try:
        old = _json(kueue_cluster, "get", f"clusterqueues.v1beta1.kueue.x-k8s.io/{name}")
        assert old["apiVersion"] == "kueue.x-k8s.io/v1beta1" and old["spec"]["cohort"] == "team-a", old["spec"]
        new = _json(kueue_cluster, "get", f"clusterqueues.v1beta2.kueue.x-k8s.io/{name}")
        assert new["spec"]["cohortName"] == "team-a" and "cohort" not in new["spec"], new["spec"]
    finally:
        kueue_cluster.kubectl("delete", f"clusterqueue/{name}", "--wait=false", check=False)


def test_render_webhooks_follows_the_integrations(kueue_cluster: ClusterInfo) -> None:
    # rendered from the module's manifests, which the build copied to the cache
    names = lambda cfgs: {w["name"] for c in cfgs for w in c["webhooks"]}  # noqa: E731
    pod_only = names(kueue_dc.render_webhooks("https://127.0.0.1:1", b"ca"))
    with_jobs = names(kueue_dc.render_webhooks("https://127.0.0.1:1", b"ca", ["pod", "batch/job"]))
    assert {"mpod.kb.io", "vpod.kb.io", "vworkload.kb.io", "vclusterqueue.kb.io"} <= pod_only
    assert not pod_only & {"mjob.kb.io", "vjob.kb.io", "mjobset.kb.io", "mdeployment.kb.io"}
    assert with_jobs - pod_only == {"mjob.kb.io", "vjob.kb.io"}
    with pytest.raises(ValueError, match="ray"):
        kueue_dc.render_webhooks("https://127.0.0.1:1", b"ca", ["ray.io/rayjob"])


def test_unmanaged_namespace_is_left_alone(kueue_cluster: ClusterInfo) -> None:
    # the shared session cluster stays Kueue-free outside labelled namespaces, queue label or not
    ns = f"plain-{uuid.uuid4().hex[:8]}"
    kueue_cluster.kubectl("create", "namespace", ns)
    try:
        cluster.wait_for_default_service_account(kueue_cluster, ns)
        pod = ko.in_pod_group(_pod("p", ns), "nowhere", "g", 1)
        out = json.loads(kueue_cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod)).stdout)
        assert not ko.is_gated(out) and ko.MANAGED_LABEL not in out["metadata"]["labels"]
    finally:
        kueue_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_pod_group_with_quota_is_admitted_as_one_workload_and_both_pods_bound(env: Env) -> None:
    queue = env.queue(gpus=2 * GPUS_PER_POD)
    names = env.create_group(queue, "grp")
    for p in env.pods(names):  # Kueue's webhook held each pod back at creation
        assert p["metadata"]["labels"][ko.MANAGED_LABEL] == "true"

    _wait_for("Workload grp admitted", lambda: _admitted(env, "grp"), env.diag)
    _wait_for("both pods Running on GPU nodes", lambda: _running_on_gpu_nodes(env, names), env.diag)

    # one Workload for the whole group, named after it, holding both pods and all 8 GPUs
    wls = env.workloads()
    assert [w["metadata"]["name"] for w in wls] == ["grp"], [w["metadata"]["name"] for w in wls]
    wl = wls[0]
    assert sum(ps["count"] for ps in wl["spec"]["podSets"]) == 2
    adm = wl["status"]["admission"]
    assert adm["clusterQueue"] == queue
    gpus = sum(int(a["resourceUsage"]["nvidia.com/gpu"]) for a in adm["podSetAssignments"])
    assert gpus == 2 * GPUS_PER_POD
    admitted_at = ko.condition(wl, "Admitted")["lastTransitionTime"]

    for p in env.pods(names):
        assert not ko.is_gated(p)
        sched = next(c for c in p["status"]["conditions"] if c["type"] == "PodScheduled")
        assert sched["status"] == "True"
        assert sched["lastTransitionTime"] >= admitted_at  # released by the admission, not before (RFC 3339, UTC)
        # bound by the real kube-scheduler once ungated
        ev = _json(env.info, "get", "events", "-n", env.ns, "--field-selector", f"involvedObject.name={p['metadata']['name']},reason=Scheduled")
        assert ev["items"] and (ev["items"][0].get("reportingComponent") or ev["items"][0]["source"].get("component")) == "default-scheduler"

    # tearing the group down is deleting its Workload: Kueue deletes the pods, lifts its finalizer
    # and gives the quota back
    env.info.kubectl("delete", "workloads.kueue.x-k8s.io/grp", "-n", env.ns, "--wait=false")

    def gone() -> tuple[bool, object]:
        left = [p["metadata"]["name"] for p in _json(env.info, "get", "pods", "-n", env.ns)["items"]]
        cq = _json(env.info, "get", f"clusterqueues.kueue.x-k8s.io/{queue}")["status"]
        return not left and not cq.get("admittedWorkloads"), (left, cq.get("admittedWorkloads"))

    _wait_for("the group's pods deleted and the quota released", gone, env.diag)


def test_pod_group_is_all_or_nothing_until_the_quota_fits(env: Env) -> None:
    # quota for one pod's GPUs only: a pod-by-pod admitter would release one pod; Kueue releases none
    queue = env.queue(gpus=GPUS_PER_POD)
    names = env.create_group(queue, "gang")

    def pending() -> tuple[bool, object]:
        wl = env.workload("gang")
        c = wl and ko.condition(wl, "QuotaReserved")
        return bool(c and c["status"] == "False" and c.get("reason") == "Pending"), (wl or {}).get("status")

    def counted_pending() -> tuple[bool, object]:
        st = _json(env.info, "get", f"clusterqueues.kueue.x-k8s.io/{queue}").get("status") or {}
        return st.get("pendingWorkloads") == 1, st

    _wait_for("Workload gang pending for quota", pending, env.diag)
    cq = _wait_for("the ClusterQueue counting it pending", counted_pending, env.diag)
    assert not cq.get("admittedWorkloads") and not cq.get("reservingWorkloads"), cq
    wl = env.workload("gang")
    msg = ko.condition(wl, "QuotaReserved")["message"]
    assert "nvidia.com/gpu" in msg and "insufficient quota" in msg, msg
    assert not wl["status"].get("admission")
    assert (ko.condition(wl, "Admitted") or {}).get("status") != "True"
    for p in env.pods(names):
        assert ko.is_gated(p), p["spec"].get("schedulingGates")
        assert not p["spec"].get("nodeName") and p["status"]["phase"] == "Pending"
        sched = next(c for c in p["status"]["conditions"] if c["type"] == "PodScheduled")
        assert sched["reason"] == "SchedulingGated"

    # raising the quota admits the whole group at once
    env.set_gpu_quota(queue, 2 * GPUS_PER_POD)
    _wait_for("Workload gang admitted", lambda: _admitted(env, "gang"), env.diag)
    _wait_for("both pods Running on GPU nodes", lambda: _running_on_gpu_nodes(env, names), env.diag)
    assert not any(ko.is_gated(p) for p in env.pods(names))
    assert [w["metadata"]["name"] for w in env.workloads()] == ["gang"]


def test_without_group_labels_the_same_pods_are_admitted_one_by_one(env: Env) -> None:
    # the contrast that makes the test above mean something: with the queue label only, each pod is
    # its own Workload, so the quota for one pod's GPUs releases exactly one of them
    queue = env.queue(gpus=GPUS_PER_POD)
    names = ["solo-0", "solo-1"]
    pods = [_pod(n, env.ns) for n in names]
    for p in pods:
        p["metadata"]["labels"][ko.QUEUE_NAME_LABEL] = queue
    env.info.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))

    def one_running() -> tuple[bool, object]:
        states = [(p["status"].get("phase"), ko.is_gated(p)) for p in env.pods(names)]
        return sorted(states) == [("Pending", True), ("Running", False)], states

    _wait_for("one pod admitted and running, the other gated", one_running, env.diag)
    wls = env.workloads()
    assert len(wls) == 2, [w["metadata"]["name"] for w in wls]
    admitted = [w for w in wls if (ko.condition(w, "Admitted") or {}).get("status") == "True"]
    assert len(admitted) == 1
