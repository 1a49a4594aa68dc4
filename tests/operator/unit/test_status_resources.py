"""Pure parts of the operator: status derivation, manifests, world conversion. No cluster."""
from __future__ import annotations

from muxtune.api.finetunetask import FineTuneTask
from muxtune.operator import resources, status, world
from muxtune.operator.config import OperatorConfig
from muxtune.operator.memory import Parallelism
from muxtune.operator.planner import GroupPlan

NOW, LATER = "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z"


def view(situation, **kw):
    return status.TaskView(generation=kw.pop("generation", 1), max_steps=10, situation=situation, **kw)


def test_pending_then_placed_then_running_then_succeeded():
    s0 = status.compute_status(None, view("unplaceable", reason="WaitingForGpus", message="no GPUs"), NOW)
    assert s0["phase"] == "Pending" and s0["progress"] == "0/10" and s0["observedGeneration"] == 1
    assert status.transition_event(None, s0)[:2] == ("Warning", "WaitingForGpus")
    s1 = status.compute_status(s0, view("member", group="g1"), NOW)
    assert s1["phase"] == "Placed" and s1["group"] == "g1"
    assert status.transition_event(s0, s1)[1] == "Placed"
    rep = {"phase": "Running", "step": 3, "totalSteps": 10, "loss": 1.5, "tokensPerSecond": 100.0, "checkpoint": None}
    s2 = status.compute_status(s1, view("member", group="g1", pod_state="running", report=rep), LATER)
    assert (s2["phase"], s2["step"], s2["progress"], s2["loss"], s2["startTime"]) == ("Running", 3, "3/10", 1.5, LATER)
    placed = [c for c in s2["conditions"] if c["type"] == "Placed"][0]
    assert placed["lastTransitionTime"] == NOW  # unchanged condition keeps its time
    done = dict(rep, phase="Succeeded", step=10)
    s3 = status.compute_status(s2, view("member", group="g1", pod_state="running", report=done), LATER)
    assert s3["phase"] == "Succeeded" and s3["completionTime"] == LATER and s3["progress"] == "10/10"
    # terminal: later observations change nothing
    assert status.compute_status(s3, view("pending"), LATER) == s3
    assert not status.differs(s3, status.compute_status(s3, view("member", group="g2"), LATER))


def test_task_finished_between_polls_still_gets_a_start_time():
    """A short task can go Placed -> Succeeded without the operator ever seeing it Running."""
    placed = status.compute_status(None, view("member", group="g1", pod_state="running"), NOW)
    assert placed["phase"] == "Placed" and not placed.get("startTime")
    done = {"phase": "Succeeded", "step": 10, "totalSteps": 10, "loss": 1.0}
    s = status.compute_status(placed, view("member", group="g1", pod_state="running", report=done), LATER)
    assert s["phase"] == "Succeeded" and s["startTime"] and s["completionTime"] == LATER


def test_suspend_and_kueue_and_invalid():
    s = status.compute_status({"phase": "Running", "step": 4, "loss": 2.0, "group": "g"}, view("suspended"), NOW)
    assert s["phase"] == "Suspended" and "group" not in s and s["step"] == 4 and s["loss"] == 2.0
    k = status.compute_status(None, view("suspended", kueue=True), NOW)
    assert [c["reason"] for c in k["conditions"] if c["type"] == "Placed"] == ["WaitingForAdmission"]
    bad = status.compute_status(None, view("invalid", message="spec.dataset: Field required"), NOW)
    assert bad["phase"] == "Failed" and "dataset" in bad["message"]


def test_pod_failure_fails_members():
    s = status.compute_status(None, view("member", group="g", pod_state="failed", pod_message="OOMKilled"), NOW)
    assert s["phase"] == "Failed" and s["message"] == "OOMKilled"
    assert status.transition_event(None, s)[0] == "Warning"


def _ftt(**spec):
    base = {"baseModel": "model:llama", "dataset": {"path": "sets/a.jsonl"},
            "training": {"maxSteps": 5, "learningRate": 1e-3}}
    base.update(spec)
    return FineTuneTask.model_validate({"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
                                        "metadata": {"name": "a", "namespace": "ns", "uid": "u"}, "spec": base})


def test_engine_document_rewrites_paths():
    doc = resources.engine_task_document(_ftt())
    assert doc["spec"]["baseModel"] == "/models/llama"
    # relative to --data-root /data, inside the task's own namespace's area
    assert doc["spec"]["dataset"]["path"] == "ns/sets/a.jsonl"
    assert "path" not in doc["spec"]["output"]  # the engine writes <output>/<ns>/<name>
    assert doc["metadata"] == {"name": "a", "namespace": "ns", "uid": "u"}
    FineTuneTask.model_validate(doc)  # still the engine's schema
    builtin = resources.engine_task_document(_ftt(), {"spec": {"source": {"builtin": "tiny-llama"}}})
    assert builtin["spec"]["baseModel"] == "builtin:tiny-llama"  # a builtin BaseModel needs no volume
    named = resources.engine_task_document(_ftt(baseModel="builtin:tiny-llama", output={"path": "runs/a"}))
    assert named["spec"]["output"]["path"] == "runs/a"  # honoured by the engine under /output/<ns>/


def _group(dp=2):
    gp = GroupPlan("mt-x", "ns", "model:llama", "ns", Parallelism(dp=dp, tp=2), "H100", 81920, ("ns/a",), 1, True, True)
    m = resources.group_manifest(gp, [{"metadata": {"name": "a", "namespace": "ns", "uid": "u"}}], 4096)
    m["metadata"]["uid"] = "group-uid"
    return m


def test_pod_manifest_restricted_and_gpus():
    bm = {"spec": {"source": {"pvc": {"claimName": "weights", "path": "llama"}}}}
    pod = resources.pod_manifest(_group(), 1, OperatorConfig(data_pvc="datasets", output_pvc="outputs"), bm)
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "datasets"
    assert vols["output"]["persistentVolumeClaim"]["claimName"] == "outputs"
    assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["serviceAccountName"] == "muxtune-engine"
    assert vols["model"]["persistentVolumeClaim"]["claimName"] == "weights"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models/llama"]["subPath"] == "llama" and mounts["/models/llama"]["readOnly"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    # a multi-pod world through torchrun's PET_* defaults only (RANK/WORLD_SIZE would make it a worker)
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("2", "2", "1")
    assert env["PET_MASTER_ADDR"] == "mt-x-0.mt-x.ns.svc" and "WORLD_SIZE" not in env and "RANK" not in env
    assert c["args"][-6:] == ["--dp", "2", "--tp", "2", "--pp", "1"]
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "group-uid"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "muxtune-engine"
    assert "podAntiAffinity" in pod["spec"]["affinity"]
    # deterministic
    assert resources.pod_manifest(_group(), 1, OperatorConfig(data_pvc="datasets", output_pvc="outputs"), bm) == pod


def test_node_inventory_subtracts_bound_pods():
    node = {"metadata": {"name": "n1", "labels": {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.product": "H100"},
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}}
    pod = {"metadata": {"name": "p", "namespace": "x"}, "spec": {"nodeName": "n1", "containers": [
        {"resources": {"limits": {"nvidia.com/gpu": "3"}}}]}, "status": {"phase": "Running"}}
    done = {**pod, "status": {"phase": "Succeeded"}}
    cn = world.compact_node(node)
    assert cn["fake"] and cn["gpus"] == 8
    (inv,) = world.node_inventory([cn], [world.compact_pod(pod), world.compact_pod(done)])
    assert (inv.gpus_allocatable, inv.gpus_free, inv.gpu_memory_mib, inv.gpu_product) == (8, 5, 81920, "H100")


def test_resource_of():
    from muxtune.operator.kube import _resource_of

    assert _resource_of("/apis/muxtune.io/v1alpha1/namespaces/a/finetunetasks/t/status") == "finetunetasks/status"
    assert _resource_of("/api/v1/nodes") == "nodes" and _resource_of("/api/v1/namespaces/a/pods") == "pods"
