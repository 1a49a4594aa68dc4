"""The operator against a real API server (local control plane, kwok GPU nodes, real kube-scheduler),
running as a subprocess with the Helm chart's ServiceAccount and RBAC."""
from __future__ import annotations

import hashlib
import time

import pytest

from tests.helpers.cluster import apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def ftt(info, ns, name):
    return kjson(info, "get", "finetunetask", name, "-n", ns)


def phase(info, ns, name):
    return (ftt(info, ns, name).get("status") or {}).get("phase")


def groups(info, ns):
    return kjson(info, "get", "backbonegroups", "-n", ns)["items"]


def group_pods(info, ns, group):
    return kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]


def cm_task_names(info, ns, group):
    import yaml

    cm = kjson(info, "get", "configmap", f"{group}-tasks", "-n", ns)
    return sorted(d["metadata"]["name"] for d in yaml.safe_load_all(cm["data"]["tasks.yaml"]) if d)


def check_group_pod(info, ns: str, group_name: str, owner: dict, status_digest: str) -> None:
    """The group's one pod: bound by the real scheduler to a kwok GPU node, the engine's command line,
    a locked-down security context, and only this namespace's areas mounted."""

    def bound():
        pods = group_pods(info, ns, group_name)
        return pods if pods and all(p["spec"].get("nodeName") for p in pods) else None

    pods = wait_for(bound, 60, what="the group pod bound to a node")
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] in info.gpu_nodes
    assert pod["metadata"]["ownerReferences"] == [owner]
    c = pod["spec"]["containers"][0]
    gspec = kjson(info, "get", "backbonegroup", group_name, "-n", ns)["spec"]  # the planner's budget reaches the pod
    assert c["command"] + c["args"] == ["muxtune", "run", "/etc/muxtune/tasks/tasks.yaml", "--output", "/output",
                                        "--data-root", "/data", "--watch", "--metrics-host", "0.0.0.0",
                                        "--metrics-port", "9400", "--no-progress", "--no-remote",
                                        "--status-token-sha256", status_digest,  # the digest only, never the token
                                        "--token-budget", str(gspec["tokenBudget"]),
                                        *(["--recompute"] if gspec.get("recompute") else [])]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    sc, psc = c["securityContext"], pod["spec"]["securityContext"]
    assert sc["runAsNonRoot"] and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert psc["runAsNonRoot"] and psc["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # only this namespace's data and output areas, never the roots
    assert {m for m in mounts if m.startswith(("/data", "/output/"))} == {f"/data/{ns}", f"/output/{ns}"}
    assert mounts[f"/data/{ns}"]["subPath"] == ns and mounts[f"/data/{ns}"]["readOnly"]
    assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["serviceAccountName"] == "muxtune-engine"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["tasks"]["configMap"]["name"] == f"{group_name}-tasks"
    assert vols["output"]["hostPath"]["path"] == "/var/lib/muxtune/output" and "emptyDir" in vols["tmp"]
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for e in terms[0]["matchExpressions"]}
    assert keys == {"nvidia.com/gpu.product", "nvidia.com/gpu.memory"}


def check_signed_configmap(info, ns: str, group_name: str, owner: dict, group_key: bytes) -> None:
    """The group's ConfigMap: exactly the schema the engine reads, each task in its own area, signed."""
    import yaml

    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.facts import trust

    cm = kjson(info, "get", "configmap", f"{group_name}-tasks", "-n", ns)
    assert cm["metadata"]["ownerReferences"] == [owner]
    docs = [d for d in yaml.safe_load_all(cm["data"]["tasks.yaml"]) if d]
    uids = {n: ftt(info, ns, n)["metadata"]["uid"] for n in ("pack-0", "pack-1", "pack-2")}
    for d in docs:
        t = FineTuneTask.model_validate(d)  # exactly the schema the engine reads
        assert t.spec.output.path is None  # the engine writes <output>/<namespace>/<name>
        assert t.spec.dataset.path == f"{ns}/sets/{t.metadata.name}.jsonl"  # under --data-root, in its own area
        assert t.metadata.uid == uids[t.metadata.name]  # the engine keys checkpoints by the object's uid
    sig = trust.verify_tasks(group_key, group_name, cm["data"]["tasks.yaml"].encode(),
                             cm["data"]["tasks.yaml.sig"])
    assert sig > 0, "the ConfigMap is signed by the operator for this group"


def check_companions(info, ns: str, group_name: str, owner: dict) -> None:
    """The group's PodDisruptionBudget, the engine's token-less ServiceAccount, and its headless Service."""
    pdb = kjson(info, "get", "poddisruptionbudget", group_name, "-n", ns)
    assert pdb["spec"]["minAvailable"] == 1 and pdb["metadata"]["ownerReferences"] == [owner]
    # the disruption controller can count the group's pods (a BackboneGroup has no scale subresource)
    pdb = wait_for(lambda: (p := kjson(info, "get", "poddisruptionbudget", group_name, "-n", ns))
                   .get("status", {}).get("expectedPods") == 1 and p, 60, what="PDB expecting the pod")
    assert pdb["status"]["disruptionsAllowed"] == 0
    sa = kjson(info, "get", "serviceaccount", "muxtune-engine", "-n", ns)
    assert sa["automountServiceAccountToken"] is False
    rbs = kjson(info, "get", "rolebindings", "-n", ns)["items"]
    assert not [b for b in rbs if any(s.get("name") == "muxtune-engine" for s in b.get("subjects") or [])]
    svc = kjson(info, "get", "service", group_name, "-n", ns)
    assert svc["metadata"]["ownerReferences"] == [owner]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["port"] == 9400


def test_tasks_are_packed_into_a_group_with_pods_configmap_and_service(operator_env):
    info, ns = operator_env["info"], operator_env["a"]
    apply(info, *[task_manifest(f"pack-{i}", ns, data=f"sets/pack-{i}.jsonl") for i in range(3)])

    def placed():
        return all(phase(info, ns, f"pack-{i}") == "Placed" for i in range(3))

    wait_for(placed, 60, what="three tasks Placed")
    statuses = [ftt(info, ns, f"pack-{i}")["status"] for i in range(3)]
    (group_name,) = {s["group"] for s in statuses}
    assert all(s["observedGeneration"] == 1 and s["totalSteps"] == 4 for s in statuses)
    assert all({c["type"]: c for c in s["conditions"]}["Placed"]["reason"] == "Packed" for s in statuses)

    (g,) = [g for g in groups(info, ns) if g["metadata"]["name"] == group_name]
    assert g["spec"]["baseModel"] == "builtin:tiny-llama"
    assert sorted(t["name"] for t in g["spec"]["tasks"]) == ["pack-0", "pack-1", "pack-2"]
    assert g["spec"]["gpusPerPod"] == 1 and g["spec"]["parallelism"] == {"dp": 1, "tp": 1, "pp": 1}
    owner = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BackboneGroup", "name": group_name,
             "uid": g["metadata"]["uid"], "controller": True}

    token = operator_env["op"].status_token_file.read_text().strip()
    check_group_pod(info, ns, group_name, owner, hashlib.sha256(token.encode()).hexdigest())
    check_signed_configmap(info, ns, group_name, owner, operator_env["op"].group_key(g))
    check_companions(info, ns, group_name, owner)

    events = kjson(info, "get", "events", "-n", ns)["items"]
    assert {(e["involvedObject"]["name"], e["reason"]) for e in events} >= {(f"pack-{i}", "Placed") for i in range(3)}
    assert not [e for e in events if e["reason"] == "CalculateExpectedPodCountFailed"]
    out = info.kubectl("get", "ftt", "-n", ns).stdout
    assert "Placed" in out and group_name in out and "0/4" in out

    m = operator_env["op"].metrics()
    assert f'muxtune_operator_tasks{{namespace="{ns}",phase="Placed"}} 3.0' in m
    assert "muxtune_operator_gpus_allocated" in m and "muxtune_operator_reconcile_errors_total 0.0" in m


def test_hot_remove_suspend_kueue_and_teardown(operator_env):
    info, ns = operator_env["info"], operator_env["b"]
    apply(info, *[task_manifest(f"hr-{i}", ns) for i in range(3)])
    wait_for(lambda: all(phase(info, ns, f"hr-{i}") == "Placed" for i in range(3)), 60, what="placed")
    group_name = ftt(info, ns, "hr-0")["status"]["group"]
    pod = wait_for(lambda: group_pods(info, ns, group_name), 30, what="pod")[0]
    uid = pod["metadata"]["uid"]

    # delete one task: it leaves the ConfigMap, the pod stays the same pod
    info.kubectl("delete", "ftt", "hr-1", "-n", ns)
    wait_for(lambda: cm_task_names(info, ns, group_name) == ["hr-0", "hr-2"], 30, what="hr-1 out of the ConfigMap")
    # suspend another: removed too, phase Suspended, and back on resume
    info.kubectl("patch", "ftt", "hr-2", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: phase(info, ns, "hr-2") == "Suspended", 30, what="Suspended")
    wait_for(lambda: cm_task_names(info, ns, group_name) == ["hr-0"], 30, what="hr-2 out of the ConfigMap")
    info.kubectl("patch", "ftt", "hr-2", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: cm_task_names(info, ns, group_name) == ["hr-0", "hr-2"], 30, what="hr-2 hot-added back")
    assert phase(info, ns, "hr-2") == "Placed"
    (same,) = group_pods(info, ns, group_name)
    assert same["metadata"]["uid"] == uid, "membership changes must not restart the pod"

    # Kueue: a task created suspended with a queue label waits; admission flips suspend
    apply(info, task_manifest("queued", ns, suspend=True, labels={"kueue.x-k8s.io/queue-name": "lq"}))
    wait_for(lambda: phase(info, ns, "queued") == "Suspended", 30, what="queued Suspended")
    st = ftt(info, ns, "queued")["status"]
    assert {c["type"]: c for c in st["conditions"]}["Placed"]["reason"] == "WaitingForAdmission"
    assert "group" not in st
    info.kubectl("patch", "ftt", "queued", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: phase(info, ns, "queued") == "Placed", 30, what="admitted task Placed")

    # deleting the last active tasks removes the group and its children
    info.kubectl("delete", "ftt", "hr-0", "hr-2", "queued", "-n", ns)
    wait_for(lambda: not groups(info, ns), 30, what="group deleted")
    wait_for(lambda: not [p for p in group_pods(info, ns, group_name) if not p["metadata"].get("deletionTimestamp")],
             30, what="pods deleted")
    assert info.kubectl("get", "configmap", f"{group_name}-tasks", "-n", ns, check=False).returncode != 0


def test_unplaceable_task_is_pending_with_a_reason(operator_env):
    info, ns = operator_env["info"], operator_env["a"]
    huge = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"huge-{ns}"},
            "spec": {"source": {"hostPath": {"path": "/models/huge"}}, "allowedNamespaces": [ns],
                     "architecture": {"parameters": 2_000_000_000_000, "layers": 120, "hiddenSize": 16384,
                                      "numAttentionHeads": 128, "vocabSize": 32000}}}
    apply(info, huge, task_manifest("too-big", ns, base=f"model:huge-{ns}"),
          task_manifest("no-model", ns, base="model:does-not-exist"))

    def reason(name):
        st = ftt(info, ns, name).get("status") or {}
        return st.get("phase"), {c["type"]: c for c in st.get("conditions") or []}.get("Placed", {}).get("reason")

    wait_for(lambda: reason("too-big") == ("Pending", "TooLarge"), 30, what="TooLarge")
    wait_for(lambda: reason("no-model") == ("Pending", "ModelUnknown"), 30, what="ModelUnknown")
    bm = wait_for(lambda: (kjson(info, "get", "basemodel", f"huge-{ns}").get("status") or {}).get("ready"), 30,
                  what="BaseModel status ready")
    assert bm is True
    events = kjson(info, "get", "events", "-n", ns, "--field-selector", "involvedObject.name=too-big")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "TooLarge" for e in events)
    info.kubectl("delete", "ftt", "too-big", "no-model", "-n", ns)
    info.kubectl("delete", "basemodel", f"huge-{ns}")


# a GPT-2 config.json as save_pretrained writes it; 41952 = sum(p.numel()) of its model
# (tests/engine/families/test_config_figures.py checks every family's count against the real model)
GPT2_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": None, "n_positions": 256,
               "vocab_size": 259, "tie_word_embeddings": True, "activation_function": "gelu_new"}


def test_a_basemodel_with_only_a_source_is_sized_from_its_config_json(operator_env, tmp_path):
    """The operator runs on this host, so a hostPath here is a directory it sees: no typed figures."""
    import json

    info, ns = operator_env["info"], operator_env["a"]
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    read = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"read-{ns}"},
            "spec": {"source": {"hostPath": {"path": str(tmp_path)}}, "allowedNamespaces": [ns]}}
    blind = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"blind-{ns}"},
             "spec": {"source": {"pvc": {"claimName": "weights"}}, "allowedNamespaces": [ns],
                      "architecture": {"layers": 2}}}
    apply(info, read, blind)
    st = wait_for(lambda: (s := kjson(info, "get", "basemodel", f"read-{ns}").get("status") or {}).get("ready") and s,
                  30, what="BaseModel sized from config.json")
    arch = st["architecture"]
    assert (arch["parameters"], arch["layers"], arch["hiddenSize"], arch["modelType"]) == (41952, 2, 32, "gpt2")
    st = wait_for(lambda: (kjson(info, "get", "basemodel", f"blind-{ns}").get("status") or {}).get("message"), 30,
                  what="BaseModel message")
    assert st.startswith("missing architecture figures parameters, hiddenSize: set them in spec.architecture")
    assert "PersistentVolumeClaim" in st
    assert not kjson(info, "get", "basemodel", f"blind-{ns}")["status"]["ready"]
    info.kubectl("delete", "basemodel", f"read-{ns}", f"blind-{ns}")


def test_operator_restart_mid_reconcile_creates_no_duplicates(operator_env):
    info, ns, op = operator_env["info"], operator_env["a"], operator_env["op"]
    names = [f"rs-{i}" for i in range(8)]
    apply(info, *[task_manifest(n, ns, batch=1 + i % 3) for i, n in enumerate(names)])
    # kill the operator while it is working on them, hard (no cleanup), then start it again
    wait_for(lambda: any((ftt(info, ns, n).get("status") or {}).get("group") for n in names), 30,
             interval=0.05, what="first placement")
    op.kill()
    time.sleep(1)
    op.start()
    wait_for(lambda: all(phase(info, ns, n) == "Placed" for n in names), 60, what="all placed after restart")
    time.sleep(3)  # let a few more passes run
    gs = [g for g in groups(info, ns) if any(t["name"].startswith("rs-") for t in g["spec"]["tasks"])]
    # (they may join the group of earlier tests' tasks in this namespace: hot add)
    members = [t["name"] for g in gs for t in g["spec"]["tasks"] if t["name"].startswith("rs-")]
    assert sorted(members) == sorted(names), "every task in exactly one group"
    for g in gs:
        pods = group_pods(info, ns, g["metadata"]["name"])
        assert len(pods) == g["spec"]["parallelism"]["dp"], [p["metadata"]["name"] for p in pods]
        assert cm_task_names(info, ns, g["metadata"]["name"]) == sorted(t["name"] for t in g["spec"]["tasks"])
    for n in names:
        assert ftt(info, ns, n)["status"]["group"] in {g["metadata"]["name"] for g in gs}
    log = op.log_text()
    assert "Forbidden" not in log and " 403 " not in log and "status=403" not in log, "RBAC refused a request"
    info.kubectl("delete", "ftt", *names, "-n", ns)
    wait_for(lambda: not [g for g in groups(info, ns) if any(t["name"].startswith("rs-") for t in g["spec"]["tasks"])],
             30, what="rs- tasks out of every group")


def test_children_are_restored_level_triggered(operator_env):
    """Deleting a group's pod, or editing its ConfigMap, is undone: the world converges back."""
    info, ns = operator_env["info"], operator_env["b"]
    apply(info, task_manifest("lv-0", ns), task_manifest("lv-1", ns))
    wait_for(lambda: all(phase(info, ns, n) == "Placed" for n in ("lv-0", "lv-1")), 60, what="placed")
    group_name = ftt(info, ns, "lv-0")["status"]["group"]
    (pod,) = wait_for(lambda: group_pods(info, ns, group_name), 30, what="pod")
    info.kubectl("delete", "pod", pod["metadata"]["name"], "-n", ns, "--wait=true", "--grace-period=0", "--force")
    wait_for(lambda: [p for p in group_pods(info, ns, group_name) if p["metadata"]["uid"] != pod["metadata"]["uid"]],
             60, what="pod recreated")
    info.kubectl("patch", "configmap", f"{group_name}-tasks", "-n", ns, "--type=merge", "-p", '{"data":{"tasks.yaml":""}}')
    wait_for(lambda: cm_task_names(info, ns, group_name) == ["lv-0", "lv-1"], 30, what="ConfigMap restored")

    def restored_event():
        return [e for e in kjson(info, "get", "events", "-n", ns)["items"]
                if e["reason"] == "Restored" and e["involvedObject"]["name"] == f"{group_name}-tasks"]

    (ev,) = wait_for(restored_event, 30, what="a Restored Event on the ConfigMap")
    assert ev["type"] == "Warning" and ev["involvedObject"]["kind"] == "ConfigMap" and "restored" in ev["message"]
    info.kubectl("delete", "ftt", "lv-0", "lv-1", "-n", ns)
    wait_for(lambda: not [g for g in groups(info, ns) if g["metadata"]["name"] == group_name], 30, what="group gone")
